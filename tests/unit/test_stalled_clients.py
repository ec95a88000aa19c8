"""Clients that stall mid-stream must not block the others (real ``kvtier serve``).

More stalled uploaders than the server has worker threads, each holding an
open Put stream after one batch, plus bulk connections stopped halfway through
a request frame: a well-behaved client's puts, lookups and reads still go
through, and the stalled uploads are cancelled by the server (an error for the
stalled client, nothing half-written for anyone).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import grpc

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey
from kvtier.proto import tier_pb2 as pb
from kvtier.proto import tier_pb2_grpc as pb_grpc
from tests.helpers.servers import running_tier, server_log

NS = hashlib.sha256(b"stalled").digest()[:16]
LAYOUT = payload.layout_digest("stalled")
WORKERS = 8  # ServerConfig.max_workers default


def _item(i: int, size: int = 64 << 10) -> PutItem:
    k = BlockKey(NS, 0, 0, hashlib.sha256(b"%d" % i).digest())
    return PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(size)))


def test_stalled_uploads_and_half_sent_bulk_requests_do_not_block_others() -> None:
    with running_tier(extra_args=("--stream-idle", "2")) as tier:
        target = tier.url.split("://", 1)[1]
        release = threading.Event()
        outcomes: list[str] = []

        def stalled_upload(i: int) -> None:
            def batches():  # noqa: ANN202
                yield pb.PutBatch(items=[pb.PutItem(key=_item(1000 + i).key,
                                                    value=_item(1000 + i).value)])
                release.wait(60)  # the client never finishes its stream
            with grpc.insecure_channel(target) as ch:
                try:
                    pb_grpc.TierStub(ch).Put(batches(), timeout=60)
                    outcomes.append("completed")
                except grpc.RpcError as e:
                    outcomes.append(e.code().name)

        uploaders = [threading.Thread(target=stalled_upload, args=(i,), daemon=True)
                     for i in range(2 * WORKERS)]
        for t in uploaders:
            t.start()
        with GrpcBackend(tier.url, timeout_s=30) as b:
            bulk_port = b.health()["bulk_port"]
        half_sent = []
        for _ in range(2 * WORKERS):  # a frame announcing one key, then silence
            s = socket.create_connection(("127.0.0.1", bulk_port))
            s.sendall(b"KVTG" + struct.pack("<I", 1) + struct.pack("<H", 60))
            half_sent.append(s)
        try:
            with GrpcBackend(tier.url, timeout_s=30) as b:
                items = [_item(i) for i in range(20)]
                assert b.put_many(items) == len(items), server_log(tier)
                got = b.get_many([it.key for it in items])
                assert [bytes(v) for v in got] == [it.value for it in items]
                assert b.bulk_fallbacks == 0  # the bulk port still serves
                assert all(b.contains_many([it.key for it in items]))
            for t in uploaders:
                t.join(30)
            assert outcomes == ["CANCELLED"] * len(uploaders), (outcomes, server_log(tier))
            assert "stalled client" in server_log(tier)
        finally:
            release.set()
            for s in half_sent:
                s.close()
