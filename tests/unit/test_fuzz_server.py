"""Property-based fuzzing (Hypothesis) of a real ``kvtier serve`` process over gRPC.

Every method of the service (read from the proto descriptor, so new methods are
fuzzed too) gets random well-typed messages (random keys, counts, sizes, nested
groups) and raw garbage bytes (:mod:`kvtier.testing.fuzz`). The server must
answer each with OK or a clear client error, never an unhandled exception
(``UNKNOWN``) or a crash, and keep the entry stored before the fuzzing began.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

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


def test_server_survived_and_kept_its_data(channel: grpc.Channel, tier: TierProcess) -> None:
    """Runs after the fuzzing (file order): still up, still holding the entry."""
    assert tier.proc is not None and tier.proc.poll() is None, server_log(tier)
    with GrpcBackend(tier.url, timeout_s=10) as b:
        assert b.health()["ok"]
        assert bytes(b.get_many([KNOWN.encode()])[0]) == KNOWN_VALUE
    assert "Exception calling application" not in server_log(tier), server_log(tier)
