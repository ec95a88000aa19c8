"""Property-based fuzzing (Hypothesis) of a real ``kvtier serve`` process over gRPC.

Every method of the service (read from the proto descriptor, so new methods are
fuzzed too) gets random well-typed messages (random keys, counts, sizes, nested
groups) and raw garbage bytes (:mod:`kvtier.testing.fuzz`). The server must
answer each with OK or a clear client error, never an unhandled exception
(``UNKNOWN``) or a crash, and keep the entry stored before the fuzzing began.
Random frames go to the raw-TCP bulk port as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey
from kvtier.testing import fuzz
from tests.helpers.servers import TierProcess, running_tier, server_log

KNOWN = BlockKey(hashlib.sha256(b"fuzz-known").digest()[:16], 0, 0, b"\x42" * 32)
KNOWN_VALUE = payload.encode(KNOWN, payload.layout_digest("fuzz"), b"precious" * 512)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tier() -> Iterator[TierProcess]:
    with running_tier(capacity="64MiB") as t:
        with GrpcBackend(t.url, timeout_s=10) as b:
            assert b.put_many([PutItem(KNOWN.encode(), KNOWN_VALUE)]) == 1
        yield t


@pytest.fixture(scope="module")
def channel(tier: TierProcess) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(tier.url.split("://", 1)[1],
                               options=[("grpc.max_receive_message_length", 512 << 20)])
    yield ch
    ch.close()


@FUZZ
@given(fuzz.calls(KNOWN.encode()))
def test_random_requests_get_clear_answers(channel: grpc.Channel, tier: TierProcess,
                                           call: tuple) -> None:
    method, reqs = call
    code = fuzz.call(channel, method, [b for b, _ in reqs])
    assert fuzz.acceptable(code, any(g for _, g in reqs)), (method.name, code, reqs,
                                                            server_log(tier))


@FUZZ
@given(st.lists(st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda n, keys, rest: b"KVTG" + struct.pack("<I", len(keys) if n < 0 else n)
              + b"".join(struct.pack("<H", len(k)) + k for k in keys) + rest,
              st.one_of(st.just(-1), st.integers(0, 2**32 - 1)),  # -1: an honest count
              st.lists(fuzz.keys(), max_size=6), st.binary(max_size=64)),
    st.builds(lambda n, tok: b"KVTH" + struct.pack("<I", len(tok) if n < 0 else n) + tok,
              st.one_of(st.just(-1), st.integers(0, 2**32 - 1)), st.binary(max_size=64))),
    min_size=1, max_size=3).map(b"".join))
def test_random_bulk_frames_never_hurt_the_server(tier: TierProcess, frame: bytes) -> None:
    """Garbage, lying counts and lengths, hello frames on the raw-TCP bulk port: the
    connection is answered or dropped, never the server."""
    with socket.create_connection(("127.0.0.1", _bulk_port(tier)), timeout=10) as s, \
            contextlib.suppress(OSError):  # the server may drop us at any point
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
    assert tier.proc is not None and tier.proc.poll() is None, server_log(tier)


_PORTS: dict[int, int] = {}


def _bulk_port(tier: TierProcess) -> int:
    if tier.port not in _PORTS:
        with GrpcBackend(tier.url, timeout_s=10) as b:
            _PORTS[tier.port] = b.health()["bulk_port"]
    return _PORTS[tier.port]


def test_server_survived_and_kept_its_data(channel: grpc.Channel, tier: TierProcess) -> None:
    """Runs after the fuzzing (file order): still up, still holding the entry."""
    assert tier.proc is not None and tier.proc.poll() is None, server_log(tier)
    with GrpcBackend(tier.url, timeout_s=10) as b:
        assert b.health()["ok"]
        assert bytes(b.get_many([KNOWN.encode()])[0]) == KNOWN_VALUE
        assert b.bulk_fallbacks == 0  # read over the bulk port, which still serves
    log = server_log(tier)  # no unhandled exception in a gRPC handler or a bulk connection
    assert "Exception calling application" not in log and "Traceback" not in log, log
