"""Property-based fuzzing (Hypothesis) of the codecs that read bytes from the network or disk.

The payload codec may only ever raise :class:`PayloadError` on bad input, and must
never accept a mutated payload as valid; the bulk framing may only raise its own
protocol errors (or a closed connection) and must never allocate from a length
field it has not checked.
"""

from __future__ import annotations

import mmap
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import payload
from kvtier.keys import NAMESPACE_BYTES, BlockKey
from kvtier.payload import HEADER_SIZE, PayloadError
from kvtier.transport import tcp_bulk as bulk
from kvtier.transport.validation import MAX_VALUE

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

keys = st.builds(BlockKey, st.binary(min_size=NAMESPACE_BYTES, max_size=NAMESPACE_BYTES),
                 st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(min_size=1, max_size=32))
layouts = st.binary(min_size=8, max_size=8)
flags = st.sampled_from([0, payload.FLAG_DECODE])


@FUZZ
@given(st.binary(max_size=4 * HEADER_SIZE))
def test_decode_of_arbitrary_bytes_raises_only_payload_error(raw: bytes) -> None:
    try:
        data = payload.decode(raw)
    except PayloadError:
        return
    # Accepted: then it must be exactly what encode makes of its own header.
    h = payload.read_header(raw)
    assert payload.encode(h.key, h.layout, data, h.flags) == raw


@FUZZ
@given(keys, layouts, flags, st.binary(max_size=2048), st.data())
def test_no_mutation_of_a_payload_is_accepted(key: BlockKey, layout: bytes, fl: int,
                                              data: bytes, draw: st.DataObject) -> None:
    raw = payload.encode(key, layout, data, fl)
    assert payload.decode(raw, key, layout).tobytes() == data
    kind = draw.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    b = bytearray(raw)
    if kind == "flip":
        # Header bytes and single-bit flips are where a codec tends to look away.
        where = st.one_of(st.integers(0, HEADER_SIZE - 1), st.integers(0, len(b) - 1))
        masks = st.one_of(st.sampled_from([1 << i for i in range(8)]), st.integers(1, 255))
        for i in draw.draw(st.sets(where, min_size=1, max_size=4)):
            b[i] ^= draw.draw(masks)
    elif kind == "truncate":
        del b[draw.draw(st.integers(0, len(b) - 1)):]
    elif kind == "extend":
        b += draw.draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw.draw(st.integers(0, len(b) - 1))
        junk = draw.draw(st.binary(min_size=1, max_size=64))
        b[at:at + len(junk)] = junk
    if bytes(b) == raw:
        return
    try:
        payload.decode(bytes(b), key, layout)
    except PayloadError:
        return
    raise AssertionError(f"mutated payload accepted ({kind})")


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=256))
def test_put_verdict_never_raises(stored: bytes, new: bytes) -> None:
    key = BlockKey(b"\0" * NAMESPACE_BYTES, 0, 0, b"\1" * 32).encode()
    assert payload.put_verdict(key, stored, new) in (payload.KEEP, payload.REPLACE,
                                                     payload.REFUSE)


# -- bulk framing ------------------------------------------------------------------------------
def _feed(raw: bytes) -> socket.socket:
    """A socket whose peer sent ``raw`` and closed."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.sendall(raw)
    b.close()
    return a


@FUZZ
@given(st.one_of(
    st.binary(max_size=512),
    st.builds(lambda n, rest: b"KVTG" + struct.pack("<I", n) + rest,
              st.integers(0, 2**32 - 1), st.binary(max_size=512))))
def test_bulk_request_parser_raises_only_protocol_errors(raw: bytes) -> None:
    sock = _feed(raw)
    try:
        keys = bulk.read_request(sock)
    except (bulk.BulkProtocolError, ConnectionError):
        return
    finally:
        sock.close()
    assert keys is None or bulk.encode_request(keys) == raw[:len(bulk.encode_request(keys))]


def _checked_alloc(n: int, nkeys: int) -> mmap.mmap:
    """Lazily mapped (costs nothing until written); bounded by what the protocol allows."""
    assert 0 <= n <= nkeys * MAX_VALUE, f"allocation of {n} bytes from a bad size field"
    return mmap.mmap(-1, max(1, n))


@FUZZ
@given(st.integers(0, 64), st.one_of(
    st.binary(max_size=512),
    st.builds(lambda m, n, rest: m + struct.pack("<I", n) + rest,
              st.sampled_from([b"KVTR", b"KVTE"]), st.integers(0, 2**32 - 1),
              st.binary(max_size=512))))
def test_bulk_response_parser_raises_only_protocol_errors(nkeys: int, raw: bytes) -> None:
    sock = _feed(raw)
    try:
        views = bulk.read_response(sock, nkeys, alloc=lambda n: _checked_alloc(n, nkeys))
    except (bulk.BulkProtocolError, bulk.BulkRefused, ConnectionError):
        return
    finally:
        sock.close()
    assert len(views) == nkeys
