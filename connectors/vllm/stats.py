"""Connector counters: read in-process (tests, logs) and exported to Prometheus when asked.

Every count goes to a per-process Prometheus registry; ``snapshot()`` reads the
same numbers back as a flat dict. With ``metrics_port`` set, the scheduler
process serves them on that port and each worker on ``metrics_port + 1 + rank``
(one process hosting both roles serves them once, on ``metrics_port``).
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvtier.backends.guard import GuardedBackend

log = logging.getLogger("kvtier.connector")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class TierHealth:
    """Outage metrics read from the connector's tier clients at scrape time (never stale):
    tier errors by operation, whether each client is serving without the tier now,
    and bulk reads that fell back to gRPC."""

    def __init__(self) -> None:
        self.clients: dict[str, GuardedBackend] = {}  # "scheduler", "load", "upload"

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        errors = CounterMetricFamily("kvtier_connector_tier_errors",
                                     "Failed tier calls by operation (outages, not misses)",
                                     labels=["op"])
        for op, n in sorted(self._errors().items()):
            errors.add_metric([op], n)
        yield errors
        down = GaugeMetricFamily("kvtier_connector_tier_down",
                                 "1 while this tier client serves without the tier",
                                 labels=["client"])
        for name, g in sorted(self.clients.items()):
            down.add_metric([name], int(g.down))
        yield down
        fb = CounterMetricFamily("kvtier_connector_bulk_fallbacks",
                                 "Bulk-port reads that fell back to gRPC streaming")
        fb.add_metric([], sum(g.bulk_fallbacks for g in self.clients.values()))
        yield fb

    def _errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.clients.values():
            for op, n in list(g.errors.items()):
                out[op] = out.get(op, 0) + n
        return out

    def snapshot(self) -> dict[str, int]:
        out = {f"tier_errors_{op}": n for op, n in self._errors().items()}
        out.update({f"tier_down_{name}": int(g.down) for name, g in self.clients.items()})
        out["bulk_fallbacks"] = sum(g.bulk_fallbacks for g in self.clients.values())
        return out


class ConnectorStats:
    _process_lock = threading.Lock()
    _process_instance: ConnectorStats | None = None
    _served_port: int | None = None

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.lookups = Counter("kvtier_connector_lookups", "Lookups by outcome and stop reason",
                               ["outcome", "reason"], registry=r)
        self.tokens = Counter("kvtier_connector_tokens", "Tokens hit (told to vLLM) and saved",
                              ["direction"], registry=r)
        self.blocks = Counter("kvtier_connector_blocks", "Blocks moved", ["direction"], registry=r)
        self.bytes = Counter("kvtier_connector_bytes", "Payload bytes moved", ["direction"],
                             registry=r)
        self.errors = Counter("kvtier_connector_errors", "Errors by kind", ["kind"], registry=r)
        self.latency = Histogram("kvtier_connector_seconds", "Load/save latency", ["op"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.loads_in_flight = Gauge("kvtier_connector_loads_in_flight",
                                     "Loads fetching or scattering right now", registry=r)
        self._extra: dict[str, int] = {}
        self._lock = threading.Lock()
        self.tier_health = TierHealth()
        r.register(self.tier_health)

    @classmethod
    def for_process(cls) -> ConnectorStats:
        """One instance per process, so both connector roles in one process share it."""
        with cls._process_lock:
            if cls._process_instance is None:
                cls._process_instance = cls()
            return cls._process_instance

    def serve(self, port: int) -> None:
        with self._process_lock:
            if ConnectorStats._served_port is not None:
                return
            try:
                start_http_server(port, registry=self.registry)
                ConnectorStats._served_port = port
                log.info("kvtier connector metrics on :%d/metrics", port)
            except OSError as e:
                log.warning("kvtier connector metrics port %d unavailable: %s", port, e)

    # -- recording -----------------------------------------------------------------
    def lookup(self, hit: bool, reason: str, tokens: int = 0) -> None:
        self.lookups.labels("hit" if hit else "miss", reason).inc()
        if tokens:
            self.tokens.labels("hit").inc(tokens)

    def moved(self, direction: str, blocks: int, nbytes: int) -> None:
        self.blocks.labels(direction).inc(blocks)
        self.bytes.labels(direction).inc(nbytes)

    def error(self, kind: str, n: int = 1) -> None:
        self.errors.labels(kind).inc(n)

    def watch_tier(self, client: str, tier: GuardedBackend) -> None:
        """Export ``tier``'s outages (errors by op, down state) as this client's."""
        self.tier_health.clients[client] = tier

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._extra[name] = self._extra.get(name, 0) + value

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """Flat view: ``lookup_hit``, ``lookup_miss:<reason>`` (``tier_unavailable``:
        an outage), ``blocks_loaded``, ``bytes_saved``, ``error_<kind>``, ``tokens_hit``,
        ``tier_errors_<op>``, ``tier_down_<client>``, ``bulk_fallbacks`` ..."""
        out: dict[str, int] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if not s.name.endswith("_total"):
                    continue
                lab = s.labels
                if metric.name == "kvtier_connector_lookups":
                    hit = lab["outcome"] == "hit"
                    key = "lookup_hit" if hit else f"lookup_miss:{lab['reason']}"
                    out[key] = out.get(key, 0) + int(s.value)
                elif "direction" in lab:
                    out[f"{metric.name.removeprefix('kvtier_connector_')}_{lab['direction']}"] = \
                        int(s.value)
                elif "kind" in lab:
                    out[f"error_{lab['kind']}"] = int(s.value)
        out.update(self.tier_health.snapshot())
        with self._lock:
            out.update(self._extra)
        return out
