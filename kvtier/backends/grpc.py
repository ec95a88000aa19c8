"""Client of a ``kvtier serve`` tier server, as a :class:`Backend`.

Lookups are answered by the server in one round trip. Bulk reads land in one
preallocated buffer (anonymous memory, see :func:`kvtier.transport.tcp_bulk.alloc_buffer`)
and come back as ``memoryview`` slices of it, not ``bytes``: no per-value copy,
and :func:`kvtier.payload.decode` takes them as they are. They
go over the server's raw-TCP bulk port when it advertises one, else over gRPC
streaming (split across a few concurrent streams for large reads). A bulk read
that fails on the connection (refused, reset, closed, garbled, timed out) is
served over gRPC within the same call's deadline, and the bulk port is tried
again ``bulk_retry_s`` later (``bulk_fallbacks`` counts them, with a warning).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc

from kvtier.backends.base import Backend, BackendError, BackendStats, EntryInfo, PutItem
from kvtier.lookup import BoundaryDetail, GroupKind, LookupQuery, LookupResult, StopReason
from kvtier.proto import tier_pb2 as pb
from kvtier.proto import tier_pb2_grpc as pb_grpc
from kvtier.security import ClientSecurity
from kvtier.transport import tcp_bulk as bulk
from kvtier.transport.grpc_channel import CLIENT_OPTIONS, identity, split_data_chunk

if TYPE_CHECKING:
    from kvtier.transport.nixl import NixlPath

PUT_BATCH_BYTES = 8 << 20
TRANSPORTS = ("auto", "nixl", "tcp", "grpc")
log = logging.getLogger("kvtier.grpc")
_KIND = {GroupKind.ATTENTION: pb.ATTENTION, GroupKind.STATE: pb.STATE}


class _BulkFailed(Exception):
    """The bulk connection failed (not a refusal): gRPC can still serve the read."""


def parse_grpc_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or not parts.port:
        raise ValueError(f"tier url {url!r} must look like grpc://HOST:PORT (grpcs:// for TLS)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


class GrpcBackend(Backend):
    name = "grpc"

    def __init__(self, url: str, timeout_s: float = 2.0, streams: int = 4,
                 chunk_bytes: int = 1 << 20, bulk: bool = True, reuse_buffer: bool = False,
                 transport: str = "auto",
                 bulk_retry_s: float = 5.0, **security: str | None):
        """``timeout_s`` bounds every call (bulk socket reads and a gRPC fallback
        included): a dead or hung tier costs one timeout and a :class:`BackendError`,
        never a hang. A bulk connect may take half of it, so a filtered bulk port still
        leaves gRPC the other half.

        ``reuse_buffer``: keep each thread's bulk-read buffer and land the next read
        in it *if nothing still views the previous one* (checked, so returned views
        are never overwritten under a caller that kept them). A loader that
        consumes each read before the next skips a page-faulting allocation of the
        whole read per restore, at the price of holding that memory.

        ``transport``: ``auto`` (or ``nixl``) reads and writes over NIXL when the tier's
        Health advertises an agent and NIXL imports here, else over the bulk TCP port,
        else gRPC streaming; ``tcp`` skips NIXL; ``grpc`` uses gRPC streaming only.
        A NIXL transfer that fails is read over TCP or gRPC within the same call (its
        keys are misses if no time is left), and NIXL is retried ``bulk_retry_s`` later
        (:class:`kvtier.transport.nixl.NixlPath`); a payload that changed under the
        reader is a miss.

        ``security``: TLS and token options of
        :meth:`kvtier.security.ClientSecurity.from_options` (``grpcs://`` means TLS).
        """
        self.url = url
        self.target = parse_grpc_url(url)
        self.timeout_s = timeout_s
        self.streams = max(1, streams)
        self.chunk_bytes = chunk_bytes
        self._security = ClientSecurity.from_options(url, **security)
        self._channel = self._security.channel(self.target, CLIENT_OPTIONS)
        self._stub = pb_grpc.TierStub(self._channel)
        # Bulk chunks arrive as raw serialized messages; framing is parsed by hand.
        self._get_raw = self._channel.unary_stream(
            "/kvtier.v1.Tier/Get", request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=identity)
        self._pool = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="kvtier-get")
        self._use_bulk = bulk
        self._reuse_buffer = reuse_buffer
        self._bulk_port: int | None = None  # learnt from Health on first bulk read
        self._bulk_local = threading.local()
        self._bulk_retry_s = bulk_retry_s
        self._bulk_retry_at = 0.0  # monotonic time before which reads skip the bulk port
        self._last_fallback_warn = 0.0
        self.bulk_fallbacks = 0  # bulk reads served over gRPC instead
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, "
                             f"got {transport!r}")
        self.transport = transport
        self._use_bulk = bulk and transport != "grpc"
        self._nixl: NixlPath | None = None
        if transport in ("auto", "nixl"):
            from kvtier.transport.nixl import NixlPath

            self._nixl = NixlPath(self._stub, timeout_s, bulk_retry_s, url)
        self.bytes_by_transport: Counter[str] = Counter()  # payload bytes read and written

    def _err(self, what: str, e: grpc.RpcError) -> BackendError:
        code = e.code() if hasattr(e, "code") else None
        detail = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return BackendError(f"{what} rejected by tier {self.url}: {detail}")
        return BackendError(f"{what} on tier {self.url} failed ({code.name if code else e}): "
                            f"{detail}")

    # -- lookup --------------------------------------------------------------------
    def lookup(self, query: LookupQuery, with_details: bool = False) -> LookupResult:
        """One round trip; sends only the hashes that close a block of some group.

        A block of a group spanning ``k`` hashes is keyed by every ``k``-th hash,
        so with ``g`` = gcd of the groups' spans the query over ``hashes[g-1::g]``
        (spans divided by ``g``) asks for exactly the same keys: a 128K-token
        prompt at 16-token hashes and 384-token blocks sends 341 hashes, not 8192.
        """
        if query.num_boundaries <= query.start_boundary or not query.groups:
            # Nothing to ask (as deepest_restorable answers it); and a max_boundary of 0
            # would read "no cap" on the wire.
            return LookupResult(query.start_boundary, StopReason.NOTHING_TO_LOOK_UP)
        g = math.gcd(query.hashes_per_boundary, *(q.hashes_per_block for q in query.groups))
        hashes = list(query.hashes[g - 1::g]) if g > 1 else query.hashes
        hlen = len(hashes[0]) if hashes else 32
        if any(len(h) != hlen for h in hashes):
            raise ValueError("all block hashes of a lookup must have the same length")
        req = pb.LookupRequest(
            namespace=query.namespace, rank=query.rank, hashes_packed=b"".join(hashes),
            hash_len=hlen, hashes_per_boundary=query.hashes_per_boundary // g,
            groups=[pb.GroupQuery(group_id=q.group_id, kind=_KIND[q.kind],
                                  hashes_per_block=q.hashes_per_block // g)
                    for q in query.groups],
            start_boundary=query.start_boundary, max_boundary=query.max_boundary or 0,
            with_details=with_details)
        try:
            r = self._stub.Lookup(req, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._err("lookup", e) from None
        details = [BoundaryDetail(d.boundary, d.boundary * query.hashes_per_boundary,
                                  {g.group_id: g.present for g in d.groups}, d.prefix_ok)
                   for d in r.details]
        return LookupResult(r.boundary, StopReason(r.reason), details,
                            attention_boundary=r.attention_boundary)

    # -- bulk reads ------------------------------------------------------------------
    def _get_one_stream(self, keys: Sequence[bytes], timeout_s: float) -> list[memoryview | None]:
        try:
            stream = self._get_raw(pb.GetRequest(keys=list(keys), chunk_bytes=self.chunk_bytes),
                                   timeout=timeout_s)
            head = pb.GetChunk.FromString(next(stream))
            sizes = list(head.sizes)
            if len(sizes) != len(keys):
                raise BackendError(f"tier {self.url} answered {len(sizes)} sizes for "
                                   f"{len(keys)} keys")
            total = sum(s for s in sizes if s > 0)
            view = memoryview(self._buffer(total))
            pos = 0
            for raw in stream:
                try:
                    data = split_data_chunk(raw)
                except ValueError as e:
                    raise BackendError(f"tier {self.url} sent a malformed chunk: {e}") from None
                n = data.nbytes
                if pos + n > total:
                    raise BackendError(f"tier {self.url} sent more bytes than announced")
                view[pos:pos + n] = data
                pos += n
            if pos != total:
                raise BackendError(f"tier {self.url} sent {pos} of {total} bytes")
        except grpc.RpcError as e:
            raise self._err("get", e) from None
        except StopIteration:
            raise BackendError(f"tier {self.url} closed the stream early") from None
        return bulk.split_views(view, sizes)

    def _buffer(self, nbytes: int) -> mmap.mmap:
        """Where one read lands: this thread's last buffer if reusable, else a new one."""
        if not self._reuse_buffer:
            return bulk.alloc_buffer(nbytes)
        buf = getattr(self._bulk_local, "buf", None)
        if buf is None or len(buf) < nbytes or bulk.buffer_in_use(buf):
            # Never a buffer the caller still views: those bytes stay as returned.
            buf = bulk.alloc_buffer(nbytes)
            self._bulk_local.buf = buf
        return buf

    def _bulk_get(self, keys: Sequence[bytes], deadline: float) -> list[memoryview | None] | None:
        """Read over the raw-TCP data plane; None if the server has none.

        Raises :class:`_BulkFailed` when the connection fails (gRPC may still serve),
        BackendError when the server refused the request (gRPC would say the same)."""
        if self._bulk_port is None:
            self._bulk_port = int(self.health().get("bulk_port", 0))
        if not self._bulk_port:
            return None
        sock = getattr(self._bulk_local, "sock", None)
        try:
            if sock is None:
                host = self.target.rsplit(":", 1)[0].strip("[]")
                sock = socket.create_connection(
                    (host, self._bulk_port), timeout=max(1e-3, min(
                        deadline - time.monotonic(), self.timeout_s / 2)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self._security.wrap_bulk(sock, host)  # TLS, token hello
                self._bulk_local.sock = sock
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            sock.sendall(bulk.encode_request(keys))
            return bulk.read_response(sock, len(keys), alloc=self._buffer)
        except bulk.BulkRefused as e:
            raise BackendError(f"get rejected by tier {self.url}: {e}") from None
        except (OSError, bulk.BulkProtocolError) as e:
            self._bulk_local.sock = None
            if sock is not None:
                sock.close()
            self._bulk_port = None  # rediscover (the server may have restarted)
            raise _BulkFailed(f"bulk read from tier {self.url} failed: "
                              f"{e or type(e).__name__}") from None

    def _bulk_failed(self, e: _BulkFailed) -> None:
        """Serve reads over gRPC for ``bulk_retry_s``, then try the bulk port again."""
        self.bulk_fallbacks += 1
        self._bulk_retry_at = time.monotonic() + self._bulk_retry_s
        now = time.monotonic()
        if now - self._last_fallback_warn > 10:
            self._last_fallback_warn = now
            log.warning("%s; falling back to gRPC streaming, bulk port retried in %gs",
                        e, self._bulk_retry_s)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:  # type: ignore[override]
        if not keys:
            return []
        deadline = time.monotonic() + self.timeout_s
        if self._nixl is not None:
            try:
                got = self._nixl.get(keys, deadline)
            except grpc.RpcError as e:
                raise self._err("locate", e) from None
            if got is not None:
                return self._count("nixl", got)  # type: ignore[return-value]
        if self._use_bulk and time.monotonic() >= self._bulk_retry_at:
            try:
                got = self._bulk_get(keys, deadline)
            except _BulkFailed as e:
                self._bulk_failed(e)
            else:
                if got is not None:
                    return self._count("tcp", got)  # type: ignore[return-value]
                # No bulk port advertised: ask Health again later, not on every read.
                self._bulk_retry_at = time.monotonic() + self._bulk_retry_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError(f"get on tier {self.url} failed: no answer within "
                               f"timeout_s={self.timeout_s}s (bulk port)")
        n = min(self.streams, max(1, len(keys) // 16))
        if n == 1:
            return self._count("grpc", self._get_one_stream(keys, remaining))
        step = -(-len(keys) // n)
        parts = [keys[i:i + step] for i in range(0, len(keys), step)]
        out: list = []
        for part in self._pool.map(lambda p: self._get_one_stream(p, remaining), parts):
            out.extend(part)
        return self._count("grpc", out)

    def read_into(self, keys: Sequence[bytes], head_bytes: int,
                  places: Sequence[Sequence[tuple[int, int]]],
                  regions: Sequence[tuple[int, int]]) -> list[memoryview | None] | None:
        """Over NIXL only (one-sided READs land anywhere registered); None otherwise."""
        if self._nixl is None or not keys:
            return None
        try:
            got = self._nixl.get_into(keys, head_bytes, places, regions,
                                      time.monotonic() + self.timeout_s)
        except grpc.RpcError as e:
            raise self._err("locate", e) from None
        if got is None:
            return None
        self.bytes_by_transport["nixl"] += sum(
            len(h) + sum(n for _, n in p) for h, p in zip(got, places) if h is not None)
        return got

    def _count(self, transport: str, values: list) -> list:
        self.bytes_by_transport[transport] += sum(len(v) for v in values if v is not None)
        return values

    # -- writes and admin ----------------------------------------------------------
    def put_many(self, items: Sequence[PutItem]) -> int:
        def batches() -> Iterator[pb.PutBatch]:
            batch, size = [], 0
            for it in items:
                batch.append(pb.PutItem(key=it.key, value=bytes(it.value), parent=it.parent or b""))
                size += len(it.value)
                if size >= PUT_BATCH_BYTES:
                    yield pb.PutBatch(items=batch)
                    batch, size = [], 0
            if batch:
                yield pb.PutBatch(items=batch)

        if not items:
            return 0
        if self._nixl is not None:
            try:
                stored = self._nixl.put(items, time.monotonic() + self.timeout_s * 4)
            except grpc.RpcError as e:
                raise self._err("reserve/commit", e) from None
            if stored is not None:
                self.bytes_by_transport["nixl"] += sum(len(it.value) for it in items)
                return stored
        self.bytes_by_transport["grpc"] += sum(len(it.value) for it in items)
        try:
            return self._stub.Put(batches(), timeout=self.timeout_s * 4).stored
        except grpc.RpcError as e:
            raise self._err("put", e) from None

    def _unary(self, what: str, method, req):  # noqa: ANN001
        try:
            return method(req, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._err(what, e) from None

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        r = self._unary("contains", self._stub.Contains, pb.KeysRequest(keys=list(keys)))
        return list(r.present)

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return self._unary("delete", self._stub.Delete, pb.KeysRequest(keys=list(keys))).count

    def pin(self, keys: Sequence[bytes], pinned: bool = True) -> int:
        return self._unary("pin", self._stub.Pin,
                           pb.PinRequest(keys=list(keys), pinned=pinned)).count

    def scan(self, prefix: bytes = b"", limit: int | None = None) -> Iterator[EntryInfo]:
        r = self._unary("scan", self._stub.Scan, pb.ScanRequest(prefix=prefix, limit=limit or 0))
        for e in r.entries:
            yield EntryInfo(e.key, e.size, e.pinned, e.children)

    def flush(self, prefix: bytes = b"") -> int:
        return self._unary("flush", self._stub.Flush, pb.FlushRequest(prefix=prefix)).count

    def stats(self) -> BackendStats:
        d = json.loads(self._unary("stats", self._stub.Stats, pb.StatsRequest()).json)
        server = d.pop("server", {})
        s = BackendStats(**d)
        s.extra = {**s.extra, **{f"server_{k}": v for k, v in server.items()}}
        return s

    def health(self) -> dict:
        r = self._unary("health", self._stub.Health, pb.HealthRequest())
        return {"ok": r.ok, "backend": r.backend, "version": r.version, "entries": r.entries,
                "bulk_port": r.bulk_port, "nixl_agent": r.nixl_agent, "url": self.url}

    def close(self) -> None:
        if self._nixl is not None:
            self._nixl.close()
        sock = getattr(self._bulk_local, "sock", None)
        if sock is not None:
            sock.close()
        self._pool.shutdown(wait=False)
        self._channel.close()
