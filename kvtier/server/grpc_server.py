"""The tier server: any :class:`~kvtier.backends.Backend` behind the ``kvtier.v1.Tier`` gRPC API.

Bad input gets ``INVALID_ARGUMENT`` with a message saying what is wrong; a
failing backend gets ``UNAVAILABLE``. Neither stops the server nor touches
what is stored.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, overload

import grpc

from kvtier import __version__
from kvtier.backends import Backend, BackendError, open_backend
from kvtier.backends.base import PutItem
from kvtier.config import ServerConfig
from kvtier.keys import NAMESPACE_BYTES
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery
from kvtier.proto import tier_pb2 as pb
from kvtier.proto import tier_pb2_grpc as pb_grpc
from kvtier.transport.grpc_channel import (
    DEFAULT_CHUNK,
    GRPC_OPTIONS,
    MAX_MESSAGE,
    data_chunk,
    identity,
)
from kvtier.transport.validation import (
    MAX_KEYS,
    MAX_VALUE,
    BadRequest,
    check_count,
    check_keys,
)

if TYPE_CHECKING:
    from kvtier.transport.nixl import ServerPlane
    from kvtier.transport.tcp_bulk import BulkServer

log = logging.getLogger("kvtier.server")

MAX_HASHES = 1 << 22  # 64M tokens at 16-token hashes: anything larger is a client bug
_KINDS = {pb.ATTENTION: GroupKind.ATTENTION, pb.STATE: GroupKind.STATE}


class PackedHashes(Sequence[bytes]):
    """Fixed-length hashes concatenated in one bytes object, sliced only when read.

    A lookup reads one hash per block (a block spans ``hashes_per_block``
    hashes), so 8192 fine-grained hashes of a 128K-token prompt cost a few
    hundred slices instead of 8192.
    """

    __slots__ = ("_packed", "_n", "_len")

    def __init__(self, packed: bytes, hash_len: int):
        self._packed, self._n, self._len = packed, hash_len, len(packed) // hash_len

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("hash index out of range")
        return self._packed[i * self._n:(i + 1) * self._n]


def lookup_query(req: pb.LookupRequest) -> LookupQuery:
    """Validate a LookupRequest into a LookupQuery."""
    packed = req.hashes_packed  # each attribute access copies: read it once
    if len(req.namespace) != NAMESPACE_BYTES:
        raise BadRequest(f"namespace must be {NAMESPACE_BYTES} bytes, got {len(req.namespace)}")
    if not 1 <= req.hash_len <= 64:
        raise BadRequest(f"hash_len must be 1..64, got {req.hash_len}")
    if len(packed) % req.hash_len:
        raise BadRequest("hashes_packed is not a whole number of hashes")
    if len(packed) // req.hash_len > MAX_HASHES:
        raise BadRequest(f"more than {MAX_HASHES} hashes in one lookup")
    if req.rank < 0 or req.max_boundary < 0:
        raise BadRequest("rank and max_boundary must be >= 0 (max_boundary 0: no cap)")
    if not req.groups:
        raise BadRequest("at least one group query is required")
    groups = []
    for g in req.groups:
        if g.group_id < 0:
            raise BadRequest(f"group_id must be >= 0, got {g.group_id}")
        if g.kind not in _KINDS:
            raise BadRequest(f"group {g.group_id}: kind must be ATTENTION or STATE")
        groups.append(GroupQuery(g.group_id, _KINDS[g.kind], g.hashes_per_block))
    hashes = PackedHashes(packed, req.hash_len)
    try:
        return LookupQuery(req.namespace, req.rank, hashes, req.hashes_per_boundary, groups,
                           req.start_boundary, req.max_boundary or None)
    except ValueError as e:
        raise BadRequest(str(e)) from None


class TierServicer(pb_grpc.TierServicer):
    def __init__(self, backend: Backend, metrics: object | None = None,
                 bulk: BulkServer | None = None, nixl: ServerPlane | None = None):
        self.backend = backend
        self.metrics = metrics
        self.bulk = bulk
        self.nixl = nixl
        self.started = time.time()

    def _guard(self, context: grpc.ServicerContext, method: str, fn):  # noqa: ANN001
        t0 = time.perf_counter()
        code = "OK"
        try:
            return fn()
        except BadRequest as e:
            code = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BackendError as e:
            code = "UNAVAILABLE"
            context.abort(grpc.StatusCode.UNAVAILABLE, f"backend: {e}")
        finally:
            if self.metrics is not None:
                self.metrics.observe(method, code, time.perf_counter() - t0)

    def Lookup(self, request, context):  # noqa: N802
        def run() -> pb.LookupReply:
            res = self.backend.lookup(lookup_query(request), with_details=request.with_details)
            reply = pb.LookupReply(boundary=res.boundary, reason=res.reason.value,
                                  attention_boundary=res.attention_boundary)
            for d in res.details:
                reply.details.add(boundary=d.boundary, prefix_ok=d.prefix_ok, groups=[
                    pb.GroupPresence(group_id=g, present=p) for g, p in d.present.items()])
            return reply

        return self._guard(context, "lookup", run)

    def Get(self, request, context) -> Iterator[bytes]:  # noqa: N802
        """Yields *serialized* GetChunk messages (see :func:`data_chunk`): the bulk
        bytes are framed by hand instead of copied through protobuf."""
        chunk = request.chunk_bytes or DEFAULT_CHUNK
        values = self._guard(context, "get", lambda: (
            self._check_chunk(chunk), self.backend.get_many(check_keys(list(request.keys))))[1])
        sizes = [-1 if v is None else len(v) for v in values]
        if self.metrics is not None:
            self.metrics.moved("out", sum(s for s in sizes if s > 0))
            self.metrics.hits(sum(s >= 0 for s in sizes), sum(s < 0 for s in sizes))
        yield pb.GetChunk(sizes=sizes).SerializeToString()
        pending: list[memoryview] = []
        filled = 0
        for v in values:
            if v is None:
                continue
            mv = memoryview(v)
            while mv.nbytes:
                take = min(chunk - filled, mv.nbytes)
                pending.append(mv[:take])
                mv = mv[take:]
                filled += take
                if filled == chunk:
                    yield data_chunk(pending, filled)
                    pending, filled = [], 0
        if pending:
            yield data_chunk(pending, filled)

    @staticmethod
    def _check_chunk(chunk: int) -> None:
        if not 4096 <= chunk <= MAX_MESSAGE:
            raise BadRequest(f"chunk_bytes must be 4 KiB..{MAX_MESSAGE >> 20} MiB")

    def Put(self, request_iterator, context):  # noqa: N802
        def run() -> pb.PutReply:
            stored = 0
            nbytes = 0
            for batch in request_iterator:
                items = []
                for it in batch.items:
                    check_keys([it.key])
                    if len(it.value) > MAX_VALUE:
                        raise BadRequest(f"value of {len(it.value)} bytes exceeds {MAX_VALUE}")
                    if it.parent:
                        check_keys([it.parent])
                    items.append(PutItem(it.key, it.value, it.parent or None))
                    nbytes += len(it.value)
                stored += self.backend.put_many(items)
            if self.metrics is not None:
                self.metrics.moved("in", nbytes, "grpc")
            return pb.PutReply(stored=stored)

        return self._guard(context, "put", run)

    def Contains(self, request, context):  # noqa: N802
        return self._guard(context, "contains", lambda: pb.ContainsReply(
            present=self.backend.contains_many(check_keys(list(request.keys)))))

    def Delete(self, request, context):  # noqa: N802
        return self._guard(context, "delete", lambda: pb.CountReply(
            count=self.backend.delete_many(check_keys(list(request.keys)))))

    def Pin(self, request, context):  # noqa: N802
        return self._guard(context, "pin", lambda: pb.CountReply(
            count=self.backend.pin(check_keys(list(request.keys)), request.pinned)))

    def Scan(self, request, context):  # noqa: N802
        def run() -> pb.ScanReply:
            if request.limit < 0:
                raise BadRequest("limit must be >= 0")
            entries = self.backend.scan(request.prefix, request.limit or None)
            return pb.ScanReply(entries=[pb.ScanEntry(key=e.key, size=e.size, pinned=e.pinned,
                                                      children=e.children) for e in entries])

        return self._guard(context, "scan", run)

    def Flush(self, request, context):  # noqa: N802
        return self._guard(context, "flush", lambda: pb.CountReply(
            count=self.backend.flush(request.prefix)))

    def Stats(self, request, context):  # noqa: N802
        def run() -> pb.StatsReply:
            d = self.backend.stats().as_dict()
            d["server"] = {"version": __version__, "uptime_s": round(time.time() - self.started)}
            return pb.StatsReply(json=json.dumps(d))

        return self._guard(context, "stats", run)

    def Health(self, request, context):  # noqa: N802
        def run() -> pb.HealthReply:
            h = self.backend.health()
            return pb.HealthReply(ok=bool(h.get("ok")), backend=str(h.get("backend", "")),
                                  version=__version__, entries=int(h.get("entries", 0)),
                                  bulk_port=self.bulk.port if self.bulk and self.bulk.listening
                                  else 0, **self._nixl_health())

        return self._guard(context, "health", run)

    # -- NIXL data plane -------------------------------------------------------------
    def _nixl_health(self) -> dict:
        plane = self.nixl
        if plane is None or not plane.ready:
            return {}
        return {"nixl_agent": plane.agent.name,  # type: ignore[union-attr]
                "nixl_metadata": plane.metadata}

    def _plane(self) -> ServerPlane:
        if self.nixl is None or not self.nixl.ready:
            raise BadRequest("this tier has no NIXL data plane (Health.nixl_agent is empty); "
                             "read with Get or the bulk port")
        return self.nixl

    def _extents(self, locs: Sequence) -> list[pb.Extent]:
        arena = self.backend.arena  # type: ignore[attr-defined]
        return [pb.Extent() if x is None else pb.Extent(
            address=arena.base_address(x.region) + x.offset, length=x.length,
            generation=x.generation) for x in locs]

    def Locate(self, request, context):  # noqa: N802
        def run() -> pb.LocateReply:
            plane = self._plane()
            lease_s = _seconds(request.lease_s, "lease_s")
            plane.kick(1.0)  # and while the lease is out: the reader may be reading
            keys = list(request.keys)
            check_count(len(keys))
            lease, locs = self.backend.locate(keys, lease_s)  # type: ignore[attr-defined]
            try:  # a key found was checked when it was stored: check only the others
                check_keys([k for k, x in zip(keys, locs) if x is None])
            except BadRequest:
                self.backend.release(lease)  # type: ignore[attr-defined]
                raise
            if self.metrics is not None:
                found = sum(x is not None for x in locs)
                self.metrics.hits(found, len(locs) - found)
            bases = self.backend.arena.bases  # type: ignore[attr-defined]
            return pb.LocateReply(
                lease_id=lease, nixl_agent=plane.agent.name,  # type: ignore[union-attr]
                address=[0 if x is None else bases[x.region] + x.offset for x in locs],
                length=[0 if x is None else x.length for x in locs],
                generation=[0 if x is None else x.generation for x in locs],
                region=[0 if x is None else x.region for x in locs])

        return self._guard(context, "locate", run)

    def Release(self, request, context):  # noqa: N802
        def run() -> pb.ReleaseReply:
            self._plane()
            if request.read_bytes < 0:
                raise BadRequest("read_bytes must be >= 0")
            if self.metrics is not None and request.read_bytes:
                self.metrics.moved("out", request.read_bytes, "nixl")
            return pb.ReleaseReply(released=self.backend.release(  # type: ignore[attr-defined]
                request.lease_id))

        return self._guard(context, "release", run)

    def Reserve(self, request, context):  # noqa: N802
        def run() -> pb.ReserveReply:
            plane = self._plane()
            sizes = list(request.sizes)
            if len(sizes) > MAX_KEYS:
                raise BadRequest(f"too many extents in one call ({len(sizes)} > {MAX_KEYS})")
            if any(not 0 <= n <= MAX_VALUE for n in sizes):
                raise BadRequest(f"every size must be 0..{MAX_VALUE} bytes")
            if sum(sizes) > MAX_MESSAGE:  # space costs a reserver nothing: bound it per call
                raise BadRequest(f"more than {MAX_MESSAGE >> 20} MiB in one reservation; "
                                 "split it")
            ttl_s = _seconds(request.ttl_s, "ttl_s")
            plane.kick(1.0)
            rid, locs = self.backend.reserve(sizes, ttl_s)  # type: ignore[attr-defined]
            return pb.ReserveReply(reservation_id=rid, extents=self._extents(locs),
                                   nixl_agent=plane.agent.name)  # type: ignore[union-attr]

        return self._guard(context, "reserve", run)

    def Commit(self, request, context):  # noqa: N802
        def run() -> pb.PutReply:
            self._plane()
            items = []
            for it in request.items:
                check_keys([it.key, *([it.parent] if it.parent else [])])
                items.append((it.index, it.key, it.parent or None, it.checksum))
            stored, nbytes = self.backend.commit(  # type: ignore[attr-defined]
                request.reservation_id, items)
            if self.metrics is not None:
                self.metrics.moved("in", nbytes, "nixl")
            return pb.PutReply(stored=stored)

        return self._guard(context, "commit", run)


def _seconds(v: float, name: str) -> float:
    """A lease or reservation time: 0 means the default (5 s)."""
    if v == 0:
        return 5.0
    if not 0 < v <= 60:  # also refuses NaN
        raise BadRequest(f"{name} must be in (0, 60] seconds, got {v}")
    return v


def method_handlers(servicer: TierServicer) -> grpc.GenericRpcHandler:
    """Handlers for every method of the service, from its descriptor.

    Same as the generated registration, except that Get's chunks are sent as
    the pre-serialized bytes the servicer yields.
    """
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    service = pb.DESCRIPTOR.services_by_name["Tier"]
    handlers = {}
    for m in service.methods:
        req_cls = getattr(pb, m.input_type.name)
        resp_cls = getattr(pb, m.output_type.name)
        make = factories[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            getattr(servicer, m.name), request_deserializer=req_cls.FromString,
            response_serializer=identity if m.name == "Get" else resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def make_backend(config: ServerConfig) -> Backend:
    if config.backend == "redis":
        assert config.redis_url is not None
        return open_backend(config.redis_url)
    if nixl_wanted(config):
        from kvtier.backends.arena_store import ArenaMemoryBackend

        return ArenaMemoryBackend(config.capacity, policy=config.eviction)
    from kvtier.backends.memory import MemoryBackend

    return MemoryBackend(config.capacity, policy=config.eviction)


def nixl_wanted(config: ServerConfig) -> bool:
    """``nixl`` None (the default): on when NIXL imports and the store is in memory."""
    if config.backend != "memory" or config.nixl is False:
        return False
    if config.nixl is None and (config.tls_cert or config.auth_token_file):
        # NIXL bytes are unencrypted, and an agent holding the (Health-advertised) metadata
        # can read any registered arena byte, past tenant checks: only when asked for.
        return False
    from kvtier.transport.nixl import available

    return config.nixl is True or available()


def serve(config: ServerConfig, backend: Backend | None = None) -> tuple[grpc.Server, int]:
    """Start serving in background threads; returns the server and the bound gRPC port.

    The bulk data plane (if enabled) is attached as ``server.kvtier_bulk``."""
    backend = backend or make_backend(config)
    from kvtier.backends.snapshot import start_snapshots

    # Warm restart: the snapshot is in the store before the first request is answered.
    snapshots = start_snapshots(backend, config.snapshot_dir, config.snapshot_interval_s)
    metrics = None
    if config.metrics_port is not None:
        from kvtier.metrics import ServerMetrics

        metrics = ServerMetrics(backend)
        metrics.serve(config.metrics_port)
    # No SO_REUSEPORT (gRPC's default on Linux): a second `kvtier serve` on a busy port must
    # fail, not silently split the clients between two separate stores.
    from kvtier.security import server_security

    security = server_security(config, backend, metrics)  # TLS, tokens (after the snapshot)
    # A message is received whole before any check: its size bounds what one request costs.
    limited = [o for o in GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    limited.append(("grpc.max_receive_message_length", config.max_message_bytes))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                         options=[*limited, ("grpc.so_reuseport", 0)],
                         interceptors=security.interceptors(),
                         maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    # Bind the gRPC port before the bulk port: an any-port bulk listener could otherwise be
    # handed the very port the caller picked for gRPC (a free port it just probed).
    port = security.add_port(server, f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port} (in use?)")
    bulk = None
    if config.bulk_port is not None:
        from kvtier.transport.tcp_bulk import BulkServer

        bulk = BulkServer(backend, config.host, config.bulk_port, metrics)
        security.attach_bulk(bulk)
        bulk.start()
    server.kvtier_snapshots = snapshots  # type: ignore[attr-defined]
    server.kvtier_security = security  # type: ignore[attr-defined]
    nixl = None
    if hasattr(backend, "arena") and nixl_wanted(config):
        from kvtier.transport.nixl import ServerPlane

        nixl = ServerPlane(backend)
    server.kvtier_nixl = nixl  # type: ignore[attr-defined]
    servicer = TierServicer(backend, metrics, bulk, nixl)
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    server.start()
    server.kvtier_bulk = bulk  # type: ignore[attr-defined]
    return server, port


def run_server(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls for up to 5 s."""
    server, port = serve(config)
    log.info("kvtier tier listening on %s:%d (%s backend)", config.host, port, config.backend)
    bulk = server.kvtier_bulk  # type: ignore[attr-defined]
    scheme = "grpcs" if config.tls_cert else "grpc"
    print(f"kvtier serve: listening on {scheme}://{config.host}:{port} "
          f"({config.backend} backend, capacity {config.capacity} bytes"
          + (f", bulk reads on tcp port {bulk.port}" if bulk else "") + ")", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    security = server.kvtier_security  # type: ignore[attr-defined]
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=security.reload).start())
    stop.wait()
    if bulk is not None:
        bulk.stop()
    server.stop(grace=5).wait()
    if server.kvtier_nixl is not None:  # type: ignore[attr-defined]
        server.kvtier_nixl.stop()  # type: ignore[attr-defined]  # no NIXL call at exit
    if server.kvtier_snapshots is not None:  # type: ignore[attr-defined]
        server.kvtier_snapshots.stop()  # type: ignore[attr-defined]  # after the last write
