"""Prometheus metrics of the tier server (``kvtier serve --metrics-port``).

Request counts and latencies by method and status, bytes in and out, hits and
misses; capacity, occupancy, entries and evictions are read from the backend
at scrape time, so they are never stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvtier.backends.base import Backend

_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _BackendCollector:
    def __init__(self, backend: Backend):
        self.backend = backend

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        try:
            s = self.backend.stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the backend did
            up = GaugeMetricFamily("kvtier_backend_up", "Backend answered its stats call")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("kvtier_backend_up", "Backend answered its stats call")
        up.add_metric([], 1)
        yield up
        for name, doc, value in (
            ("kvtier_capacity_bytes", "Payload bytes the store may hold", s.capacity_bytes),
            ("kvtier_used_bytes", "Payload bytes held", s.bytes_used),
            ("kvtier_entries", "Stored blocks", s.entries),
            ("kvtier_pinned_entries", "Blocks exempt from eviction", s.pinned),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        ev = CounterMetricFamily("kvtier_evictions", "Blocks evicted to make room")
        ev.add_metric([], s.evictions)
        yield ev


class ServerMetrics:
    def __init__(self, backend: Backend):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvtier_requests", "Tier RPCs by method and status",
                                ["method", "code"], registry=r)
        self.latency = Histogram("kvtier_request_seconds", "Tier RPC latency", ["method"],
                                 buckets=_BUCKETS, registry=r)
        self.bytes = Counter("kvtier_bytes", "Payload bytes moved by direction and transport "
                             "(grpc, tcp: the bulk port, nixl: one-sided reads/writes)",
                             ["direction", "transport"], registry=r)
        self.blocks = Counter("kvtier_block_reads", "Blocks asked for by outcome", ["outcome"],
                              registry=r)
        self.refusals = Counter("kvtier_refused", "Requests refused by authentication, tenant, "
                                "role or quota checks, or a failed TLS handshake", ["reason"],
                                registry=r)
        r.register(_BackendCollector(backend))

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def moved(self, direction: str, nbytes: int, transport: str = "grpc") -> None:
        self.bytes.labels(direction, transport).inc(nbytes)

    def hits(self, hits: int, misses: int) -> None:
        self.blocks.labels("hit").inc(hits)
        self.blocks.labels("miss").inc(misses)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {addr}:{port} ({e.strerror or e}); "
                          "choose a free --metrics-port") from e
