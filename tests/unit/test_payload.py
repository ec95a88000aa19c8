"""Self-describing payloads: a loader gets exactly the stored bytes, or a PayloadError."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest

from kvtier import payload
from kvtier.keys import BlockKey, Namespace, fingerprint
from kvtier.payload import HEADER_SIZE, PayloadError, decode, encode, layout_digest, read_header

NS = Namespace("tiny-qwen3next", fingerprint({"page": 196_608})).id
KEY = BlockKey(NS, 0, 3, hashlib.sha256(b"block-0").digest())
LAYOUT = layout_digest("qwen3next-tiny bf16 page=196608 block=384")
DATA = os.urandom(4096)

# Byte offsets of the header fields (see the struct in kvtier/payload.py).
OFF_MAGIC, OFF_VERSION, OFF_FLAGS, OFF_GROUP, OFF_RANK, OFF_NS = 0, 4, 5, 6, 8, 10
OFF_HLEN = OFF_NS + 16
OFF_HASH = OFF_HLEN + 1
OFF_LAYOUT = OFF_HASH + 32
OFF_LENGTH = OFF_LAYOUT + 8
OFF_CHECKSUM = OFF_LENGTH + 8


def _flip(buf: bytes, i: int, mask: int = 0x01) -> bytes:
    b = bytearray(buf)
    b[i] ^= mask
    return bytes(b)


def test_header_layout_matches_documented_offsets() -> None:
    assert HEADER_SIZE == OFF_CHECKSUM + 8
    raw = encode(KEY, LAYOUT, DATA)
    assert raw[OFF_MAGIC:OFF_MAGIC + 4] == payload.MAGIC
    assert raw[OFF_VERSION] == payload.FORMAT_VERSION
    assert raw[OFF_LAYOUT:OFF_LAYOUT + 8] == LAYOUT
    assert struct.unpack_from("<Q", raw, OFF_LENGTH)[0] == len(DATA)


# -- round trips ---------------------------------------------------------------------------------
def test_round_trip_bytes() -> None:
    raw = encode(KEY, LAYOUT, DATA)
    assert len(raw) == HEADER_SIZE + len(DATA)
    out = decode(raw, KEY, LAYOUT)
    assert isinstance(out, memoryview)
    assert out.tobytes() == DATA


def test_round_trip_memoryview_input_and_output() -> None:
    raw = encode(KEY, LAYOUT, memoryview(DATA))
    assert raw == encode(KEY, LAYOUT, DATA)
    # decode takes a memoryview (e.g. a slice of a gRPC receive buffer) without copying
    buf = bytearray(b"\xaa" * 7 + raw + b"\xbb" * 5)
    view = memoryview(buf)[7:7 + len(raw)]
    out = decode(view, KEY, LAYOUT)
    assert out.tobytes() == DATA
    buf[7 + HEADER_SIZE] ^= 0xFF  # it *is* a view into the buffer
    assert out[0] == buf[7 + HEADER_SIZE]


def test_round_trip_empty_data() -> None:
    assert decode(encode(KEY, LAYOUT, b""), KEY, LAYOUT).tobytes() == b""


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint16])
def test_round_trip_numpy_row(dtype: type) -> None:
    cache = (np.arange(4 * 1024, dtype=np.float64) * 1.5).astype(dtype).reshape(4, 1024)
    row = cache[2]
    raw = encode(KEY, LAYOUT, row)
    assert len(raw) == HEADER_SIZE + row.nbytes
    out = decode(raw, KEY, LAYOUT)
    back = np.frombuffer(out, dtype=dtype)
    np.testing.assert_array_equal(back, row)


def test_round_trip_various_keys() -> None:
    for key in (
        BlockKey(NS, 0, 0, b"\x01"),
        BlockKey(NS, 65_535, 65_535, b"\xff" * 32),
        BlockKey(Namespace("m", "l", "tenant").id, 3, 1, hashlib.sha256(b"x").digest()[:16]),
    ):
        raw = encode(key, LAYOUT, DATA)
        assert read_header(raw).key == key
        assert decode(raw, key, LAYOUT).tobytes() == DATA


def test_read_header_reports_fields() -> None:
    h = read_header(encode(KEY, LAYOUT, DATA))
    assert h.version == payload.FORMAT_VERSION
    assert h.key == KEY
    assert h.layout == LAYOUT
    assert h.length == len(DATA)


def test_decode_without_expectations_still_checks_integrity() -> None:
    raw = encode(KEY, LAYOUT, DATA)
    assert decode(raw).tobytes() == DATA
    with pytest.raises(PayloadError, match="checksum"):
        decode(_flip(raw, HEADER_SIZE + 10))


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="longer than 32"):
        encode(BlockKey(NS, 0, 0, b"\x00" * 33), LAYOUT, DATA)
    with pytest.raises(ValueError, match="8 bytes"):
        encode(KEY, b"short", DATA)


# -- corruption and foreign payloads -----------------------------------------------------------
RAW = encode(KEY, LAYOUT, DATA)


@pytest.mark.parametrize("where", [0, 1, len(DATA) // 2, len(DATA) - 1])
def test_flipped_data_byte_detected(where: int) -> None:
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode(_flip(RAW, HEADER_SIZE + where), KEY, LAYOUT)


def test_every_single_bit_flip_in_the_header_is_detected() -> None:
    """With the expected key and layout, no corrupted header bit is accepted, a defined flag
    bit included (the checksum is seeded by the header; the Hypothesis property in
    tests/unit/test_fuzz_codecs.py asks the same of any mutation)."""
    key = BlockKey(NS, 1, 2, b"\x5a" * 8)  # short hash: the padding must be checked too
    raw = encode(key, LAYOUT, DATA)
    undetected = []
    for i in range(HEADER_SIZE):
        for bit in range(8):
            flipped = _flip(raw, i, 1 << bit)
            try:
                out = decode(flipped, key, LAYOUT)
            except PayloadError:
                continue
            assert out.tobytes() == DATA  # whatever is accepted still loads the right bytes
            undetected.append((i, bit))
    assert undetected == []


@pytest.mark.parametrize(
    ("offset", "mask", "match"),
    [
        (OFF_MAGIC, 0x01, "bad magic"),
        (OFF_VERSION, 0x01, "unsupported payload format version"),
        (OFF_FLAGS, 0x80, "unknown flags 0x80"),
        (OFF_GROUP, 0x01, "different key"),
        (OFF_RANK, 0x01, "different key"),
        (OFF_NS + 5, 0x01, "different key"),
        (OFF_HLEN, 0x80, "hash length"),
        (OFF_HASH + 3, 0x01, "different key"),
        (OFF_LAYOUT + 2, 0x01, "layout does not match"),
        (OFF_LENGTH, 0x01, "length mismatch"),
        (OFF_CHECKSUM + 1, 0x01, "checksum mismatch"),
    ],
)
def test_flipped_header_byte_detected_with_reason(offset: int, mask: int, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        decode(_flip(RAW, offset, mask), KEY, LAYOUT)


def test_hash_padding_must_be_zero() -> None:
    key = BlockKey(NS, 0, 0, b"\x11" * 16)
    raw = encode(key, LAYOUT, DATA)
    with pytest.raises(PayloadError, match="hash length"):
        decode(_flip(raw, OFF_HASH + 20), key, LAYOUT)
    with pytest.raises(PayloadError, match="hash length"):
        read_header(_flip(raw, OFF_HASH + 31))  # even without expectations


# -- flags ----------------------------------------------------------------------------------------
def test_decode_flag_round_trips_and_keeps_data() -> None:
    raw = encode(KEY, LAYOUT, DATA, flags=payload.FLAG_DECODE)
    assert read_header(raw).flags == payload.FLAG_DECODE
    assert read_header(RAW).flags == 0
    assert decode(raw, KEY, LAYOUT).tobytes() == DATA
    assert raw[HEADER_SIZE:] == RAW[HEADER_SIZE:]  # the flag is metadata only


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF])
def test_unknown_flags_refused_on_write_and_read(flags: int) -> None:
    with pytest.raises(ValueError, match="unknown payload flags"):
        encode(KEY, LAYOUT, DATA, flags=flags)
    raw = bytearray(RAW)
    raw[OFF_FLAGS] = flags
    with pytest.raises(PayloadError, match="unknown flags"):
        decode(bytes(raw), KEY, LAYOUT)


@pytest.mark.parametrize("keep", [0, 3, HEADER_SIZE - 1])
def test_truncated_header(keep: int) -> None:
    with pytest.raises(PayloadError, match="truncated"):
        decode(RAW[:keep], KEY, LAYOUT)


@pytest.mark.parametrize("cut", [1, 100, len(DATA)])
def test_truncated_data(cut: int) -> None:
    with pytest.raises(PayloadError, match="length mismatch"):
        decode(RAW[:-cut], KEY, LAYOUT)


@pytest.mark.parametrize("extra", [b"\x00", b"trailing garbage" * 10])
def test_extra_bytes(extra: bytes) -> None:
    with pytest.raises(PayloadError, match="length mismatch"):
        decode(RAW + extra, KEY, LAYOUT)


def test_wrong_magic() -> None:
    with pytest.raises(PayloadError, match="bad magic"):
        decode(b"NOPE" + RAW[4:], KEY, LAYOUT)
    with pytest.raises(PayloadError, match="bad magic"):
        decode(b"\x00" * (HEADER_SIZE + 10))


def test_wrong_version() -> None:
    raw = bytearray(RAW)
    raw[OFF_VERSION] = payload.FORMAT_VERSION + 1
    with pytest.raises(PayloadError, match=f"version {payload.FORMAT_VERSION + 1}"):
        decode(bytes(raw), KEY, LAYOUT)


@pytest.mark.parametrize(
    "other",
    [
        BlockKey(NS, 0, 3, hashlib.sha256(b"block-1").digest()),  # other hash
        BlockKey(NS, 0, 2, KEY.block_hash),  # other group
        BlockKey(NS, 1, 3, KEY.block_hash),  # other rank
        BlockKey(Namespace("other", "l").id, 0, 3, KEY.block_hash),  # other namespace
        BlockKey(NS, 0, 3, KEY.block_hash[:16]),  # prefix of the hash
    ],
)
def test_wrong_expected_key(other: BlockKey) -> None:
    with pytest.raises(PayloadError, match="different key"):
        decode(RAW, other, LAYOUT)


def test_wrong_expected_layout() -> None:
    with pytest.raises(PayloadError, match="layout does not match"):
        decode(RAW, KEY, layout_digest("qwen3next-tiny fp16 page=196608 block=384"))


def test_payload_error_is_a_value_error() -> None:
    # callers that treat every ValueError as "miss" keep working
    assert issubclass(PayloadError, ValueError)


# -- layout_digest ------------------------------------------------------------------------------
def test_layout_digest_stable_and_8_bytes() -> None:
    d = layout_digest("bf16 page=196608")
    assert len(d) == 8
    assert d == layout_digest("bf16 page=196608")
    assert d == layout_digest(b"bf16 page=196608")  # str and bytes agree


def test_layout_digest_distinct() -> None:
    descs = [f"{dt} page={p} block={b}" for dt in ("bf16", "fp16", "fp8")
             for p in (196_608, 98_304) for b in (16, 384)]
    digests = {layout_digest(d) for d in descs}
    assert len(digests) == len(descs)
    assert layout_digest("") != layout_digest(" ")
