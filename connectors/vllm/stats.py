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

log = logging.getLogger("kvtier.connector")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


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

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._extra[name] = self._extra.get(name, 0) + value

    # -- reading -----------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """Flat view: ``lookup_hit``, ``lookup_miss:<reason>``, ``blocks_loaded``,
        ``bytes_saved``, ``error_<kind>``, ``tokens_hit`` ..."""
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
        with self._lock:
            out.update(self._extra)
        return out
