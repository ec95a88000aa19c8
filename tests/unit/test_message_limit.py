"""A gRPC message is received whole before any check: ``--max-message`` bounds it.

A request past the limit is refused with RESOURCE_EXHAUSTED (a client error the
caller can read), the server stays up and keeps its data, and requests under the
limit (the client batches puts at 8 MiB) work as before.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from kvtier import payload
from kvtier.backends import BackendError
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey
from tests.helpers.servers import running_tier, server_log

NS = hashlib.sha256(b"limits").digest()[:16]
LAYOUT = payload.layout_digest("limits")


def _item(i: int, size: int) -> PutItem:
    k = BlockKey(NS, 0, 0, hashlib.sha256(b"%d" % i).digest())
    return PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(size)))


def test_message_over_the_limit_is_refused_and_the_server_keeps_serving() -> None:
    with running_tier(capacity="256MiB", extra_args=("--max-message", "4MiB")) as tier, \
            GrpcBackend(tier.url, timeout_s=20) as b:
        small = [_item(i, 1 << 20) for i in range(3)]  # one message of 3 MiB
        assert b.put_many(small) == 3
        with pytest.raises(BackendError, match="RESOURCE_EXHAUSTED"):
            b.put_many([_item(99, 5 << 20)])
        assert b.health()["ok"], server_log(tier)
        got = b.get_many([it.key for it in small])
        assert [bytes(v) for v in got] == [it.value for it in small]
