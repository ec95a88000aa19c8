"""The raw-TCP bulk read plane: refusals, receive buffers, and the reuse that must never
overwrite bytes a caller still holds."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest

from kvtier import payload
from kvtier.backends.base import BackendError, PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.backends.memory import MemoryBackend
from kvtier.keys import BlockKey
from kvtier.proto import tier_pb2 as pb
from kvtier.proto import tier_pb2_grpc as pb_grpc
from kvtier.transport import tcp_bulk as bulk
from tests.helpers.servers import TierProcess

LAYOUT = payload.layout_digest("test-bulk-plane")


def _blocks(n: int, size: int, ns: bytes | None = None) -> list[tuple[BlockKey, bytes]]:
    ns = ns or os.urandom(16)
    out = []
    for i in range(n):
        k = BlockKey(ns, 0, i % 4, os.urandom(32))
        out.append((k, payload.encode(k, LAYOUT, os.urandom(size))))
    return out


@pytest.fixture(params=["bulk", "grpc-stream"])
def client(tier_server: TierProcess, request: pytest.FixtureRequest) -> Iterator[GrpcBackend]:
    """A reusing client over the raw-TCP plane, or over gRPC streaming only (one stream,
    so every read of a test lands in the same thread's buffer)."""
    b = GrpcBackend(tier_server.url, timeout_s=5.0, reuse_buffer=True,
                    bulk=request.param == "bulk", streams=1)
    yield b
    b.close()


# -- receive buffers ------------------------------------------------------------------------
def test_buffer_in_use_tracks_live_views() -> None:
    buf = bulk.alloc_buffer(0)
    assert len(buf) == 1  # an empty read still gets a (tiny) buffer
    buf = bulk.alloc_buffer(1 << 20)
    assert not bulk.buffer_in_use(buf)
    view = memoryview(buf)[10:20]
    assert bulk.buffer_in_use(buf)
    del view
    assert not bulk.buffer_in_use(buf)
    arr = np.frombuffer(memoryview(buf)[:64], np.uint8)
    assert bulk.buffer_in_use(buf)
    del arr
    assert not bulk.buffer_in_use(buf)
    # What cannot be probed is never reused.
    assert bulk.buffer_in_use(bytearray(10))
    buf.close()
    assert bulk.buffer_in_use(buf)


def test_reuse_never_overwrites_views_a_caller_kept(client: GrpcBackend) -> None:
    first, second = _blocks(8, 50_000), _blocks(8, 50_000)
    client.put_many([PutItem(k.encode(), v) for k, v in first + second])
    held = client.get_many([k.encode() for k, _ in first])
    got = client.get_many([k.encode() for k, _ in second])
    # The first read's views are still alive: the second read must not land on them.
    assert got[0].obj is not held[0].obj
    for (k, v), h in zip(first, held):
        assert bytes(h) == v
        payload.decode(h, k, LAYOUT)
    for (_k, v), g in zip(second, got):
        assert bytes(g) == v


def test_reuse_takes_the_buffer_back_once_released(client: GrpcBackend) -> None:
    blocks = _blocks(6, 40_000)
    keys = [k.encode() for k, _ in blocks]
    client.put_many([PutItem(k.encode(), v) for k, v in blocks])
    vals = client.get_many(keys)
    buf = vals[0].obj
    del vals
    gc.collect()
    again = client.get_many(keys)
    assert again[0].obj is buf, "a released buffer should be reused"
    # A numpy array over one value is a live view too.
    arr = np.frombuffer(again[2], np.uint8)
    del again
    third = client.get_many(keys)
    assert third[0].obj is not buf
    assert arr.tobytes() == blocks[2][1]
    assert [bytes(v) for v in third] == [v for _, v in blocks]


def test_fresh_buffers_without_reuse(tier_server: TierProcess) -> None:
    blocks = _blocks(4, 10_000)
    with GrpcBackend(tier_server.url, timeout_s=5.0) as b:
        b.put_many([PutItem(k.encode(), v) for k, v in blocks])
        a = b.get_many([k.encode() for k, _ in blocks])
        c = b.get_many([k.encode() for k, _ in blocks])
        assert a[0].obj is not c[0].obj
        assert [bytes(v) for v in a] == [bytes(v) for v in c] == [v for _, v in blocks]


# -- refusals ---------------------------------------------------------------------------------
def test_refused_bulk_read_says_why_and_the_connection_survives(client: GrpcBackend) -> None:
    if not client._use_bulk:
        pytest.skip("bulk plane only")
    blocks = _blocks(3, 1000)
    client.put_many([PutItem(k.encode(), v) for k, v in blocks])
    with pytest.raises(BackendError, match="rejected.*not a kvtier block key"):
        client.get_many([blocks[0][0].encode(), b"kvt1:not-a-key"])
    sock = client._bulk_local.sock
    assert sock is not None
    assert [bytes(v) for v in client.get_many([k.encode() for k, _ in blocks])] == [
        v for _, v in blocks]
    assert client._bulk_local.sock is sock, "a refusal must not cost the connection"


class _FailingBackend(MemoryBackend):
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        raise BackendError("disk on fire")


def _bulk_server(backend: MemoryBackend) -> bulk.BulkServer:
    return bulk.BulkServer(backend, "127.0.0.1", 0).start()


def test_bulk_protocol_refusal_then_answer_on_one_connection() -> None:
    backend = MemoryBackend(1 << 20)
    (k, v), = _blocks(1, 100)
    backend.put_many([PutItem(k.encode(), v)])
    srv = _bulk_server(backend)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(bulk.encode_request([b"garbage"]))
            with pytest.raises(bulk.BulkRefused, match="not a kvtier block key"):
                bulk.read_response(s, 1)
            s.sendall(bulk.encode_request([k.encode(), BlockKey(k.namespace, 0, 0, b"x").encode()]))
            got = bulk.read_response(s, 2)
            assert bytes(got[0]) == v and got[1] is None
    finally:
        srv.stop()


def test_backend_failure_is_refused_not_dropped() -> None:
    srv = _bulk_server(_FailingBackend(1 << 20))
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            (k, _), = _blocks(1, 10)
            for _ in range(2):  # twice: the connection is still in sync after a refusal
                s.sendall(bulk.encode_request([k.encode()]))
                with pytest.raises(bulk.BulkRefused, match="backend: disk on fire"):
                    bulk.read_response(s, 1)
    finally:
        srv.stop()


def test_garbage_frame_drops_only_that_connection() -> None:
    srv = _bulk_server(MemoryBackend(1 << 20))
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert s.recv(16) == b""  # closed, not answered
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(bulk.encode_request([]))
            assert bulk.read_response(s, 0) == []
    finally:
        srv.stop()


# -- lookup arguments the server must refuse ----------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("rank", -1, "rank"),
    ("max_boundary", -2, "max_boundary"),
    ("group_id", -3, "group_id"),
])
def test_lookup_negative_fields_are_invalid(tier_server: TierProcess, field: str, value: int,
                                            needle: str) -> None:
    group = pb.GroupQuery(group_id=0, kind=pb.ATTENTION, hashes_per_block=1)
    req = pb.LookupRequest(namespace=os.urandom(16), hashes_packed=os.urandom(64), hash_len=32,
                           hashes_per_boundary=1, groups=[group])
    if field == "group_id":
        req.groups[0].group_id = value
    else:
        setattr(req, field, value)
    with (grpc.insecure_channel(tier_server.url.removeprefix("grpc://")) as ch,
          pytest.raises(grpc.RpcError) as ei):
        pb_grpc.TierStub(ch).Lookup(req, timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in ei.value.details()
