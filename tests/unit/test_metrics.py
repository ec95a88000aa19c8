"""Prometheus metrics of a real ``kvtier serve --metrics-port`` subprocess, scraped over HTTP.

Each test drives a known sequence of tier calls and checks the exact counts a scrape
reports (parsed with prometheus_client's own text parser).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier import payload
from kvtier.backends import BackendError, open_backend
from kvtier.backends.base import PutItem
from kvtier.keys import BlockKey
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery
from kvtier.testing.tier_proc import TierProcess, free_port

DATA = 4096
BLOCK_BYTES = DATA + payload.HEADER_SIZE
LAYOUT = payload.layout_digest("metrics-test")


class Scrape:
    """One scrape of /metrics: samples by name and labels."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.families = {}
        for fam in text_string_to_metric_families(text):
            self.families[fam.name] = fam
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, default: float | None = None, **labels: str) -> float:
        v = self.samples.get((name, frozenset(labels.items())), default)
        assert v is not None, f"no sample {name}{labels}; have {sorted(self.samples)[:50]}"
        return v

    def requests(self, method: str, code: str = "OK") -> float:
        return self.get("kvtier_requests_total", 0.0, method=method, code=code)


def _blocks(ns: bytes, n: int) -> list[PutItem]:
    out = []
    for _ in range(n):
        k = BlockKey(ns, 0, 3, os.urandom(32))
        out.append(PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(DATA))))
    return out


@pytest.fixture
def tier_with_metrics(request: pytest.FixtureRequest) -> Iterator[tuple[TierProcess, int]]:
    capacity = getattr(request, "param", "64MiB")
    port = free_port()
    with TierProcess(capacity=capacity, extra_args=("--metrics-port", str(port))) as t:
        yield t, port


N, M, K = 12, 5, 3  # blocks put; present and missing keys in each read


def test_request_block_and_occupancy_metrics(tier_with_metrics) -> None:
    """Reads go over the raw-TCP bulk plane by default (method ``bulk_get``) and over gRPC
    streaming without it (``get``); both count blocks, bytes and requests the same way."""
    tier, port = tier_with_metrics
    before = Scrape(port)
    assert before.get("kvtier_backend_up") == 1
    assert before.get("kvtier_entries") == 0
    assert before.get("kvtier_capacity_bytes") == 64 << 20
    assert ("kvtier_block_reads_total", frozenset({("outcome", "hit")})) not in before.samples

    ns = os.urandom(16)
    items = _blocks(ns, N)
    missing = [BlockKey(ns, 0, 3, os.urandom(32)).encode() for _ in range(K)]
    wanted = [it.key for it in items[:M]] + missing
    with open_backend(tier.url) as b, open_backend(tier.url, bulk=False) as streamed:
        assert b.put_many(items) == N  # one streamed Put
        for client in (b, streamed):  # fewer than 32 keys: one request each
            got = client.get_many(wanted)
            assert [v is not None for v in got] == [True] * M + [False] * K
            with pytest.raises(BackendError, match="rejected"):
                client.get_many([b"kvt1:not-a-key"])  # a bad request
        q = LookupQuery(ns, 0, [BlockKey.decode(it.key).block_hash for it in items[:2]], 1,
                        [GroupQuery(3, GroupKind.ATTENTION)])
        assert b.lookup(q).boundary == 2

    s = Scrape(port)
    assert s.get("kvtier_block_reads_total", outcome="hit") == 2 * M
    assert s.get("kvtier_block_reads_total", outcome="miss") == 2 * K
    for method, code, n in (("put", "OK", 1), ("get", "OK", 1), ("bulk_get", "OK", 1),
                            ("lookup", "OK", 1), ("get", "INVALID_ARGUMENT", 1),
                            ("bulk_get", "INVALID_ARGUMENT", 1), ("put", "INVALID_ARGUMENT", 0),
                            ("lookup", "INVALID_ARGUMENT", 0), ("get", "UNAVAILABLE", 0)):
        assert s.requests(method, code) - before.requests(method, code) == n, (method, code)
    # latency: one observation per request, good or bad
    assert s.get("kvtier_request_seconds_count", method="get") == 2
    assert s.get("kvtier_request_seconds_count", method="bulk_get") == 2
    assert s.get("kvtier_request_seconds_count", method="put") == 1
    assert s.get("kvtier_request_seconds_sum", method="put") > 0
    assert s.get("kvtier_request_seconds_bucket", method="put", le="+Inf") == 1
    # payload bytes moved
    assert s.get("kvtier_bytes_total", direction="in", transport="grpc") == N * BLOCK_BYTES
    for transport in ("grpc", "tcp"):  # one streamed get, one over the bulk port
        assert s.get("kvtier_bytes_total", direction="out", transport=transport) == M * BLOCK_BYTES
    # occupancy, read from the store at scrape time
    assert s.get("kvtier_entries") == N
    assert s.get("kvtier_capacity_bytes") == 64 << 20
    assert s.get("kvtier_used_bytes") == N * BLOCK_BYTES > 0
    assert s.get("kvtier_pinned_entries") == 0
    assert s.get("kvtier_evictions_total") == 0
    assert s.families["kvtier_evictions"].type == "counter"
    assert s.families["kvtier_entries"].type == "gauge"
    assert s.families["kvtier_request_seconds"].type == "histogram"

    # gauges follow the store (not stale): delete and pin through the tier
    with open_backend(tier.url) as b:
        assert b.delete_many([it.key for it in items[:2]]) == 2
        assert b.pin([it.key for it in items[2:5]]) == 3
    s2 = Scrape(port)
    assert s2.get("kvtier_entries") == N - 2
    assert s2.get("kvtier_used_bytes") == (N - 2) * BLOCK_BYTES
    assert s2.get("kvtier_pinned_entries") == 3
    assert s2.requests("delete") == 1 and s2.requests("pin") == 1


def test_bulk_get_latency_is_measured(tier_with_metrics) -> None:
    tier, port = tier_with_metrics
    items = _blocks(os.urandom(16), 64)
    with open_backend(tier.url) as b:
        b.put_many(items)
        for _ in range(5):
            b.get_many([it.key for it in items])
    s = Scrape(port)
    assert s.get("kvtier_request_seconds_count", method="bulk_get") == 5
    assert s.get("kvtier_request_seconds_sum", method="bulk_get") > 0


@pytest.mark.parametrize("tier_with_metrics", ["64KiB"], indirect=True)
def test_eviction_metrics_on_small_capacity(tier_with_metrics) -> None:
    tier, port = tier_with_metrics
    fits = (64 << 10) // BLOCK_BYTES
    total = 3 * fits + 4
    with open_backend(tier.url) as b:
        assert b.put_many(_blocks(os.urandom(16), total)) == total
    s = Scrape(port)
    assert s.get("kvtier_capacity_bytes") == 64 << 10
    assert s.get("kvtier_entries") == fits
    assert s.get("kvtier_used_bytes") == fits * BLOCK_BYTES <= 64 << 10
    assert s.get("kvtier_evictions_total") == total - fits
    assert s.get("kvtier_bytes_total", direction="in", transport="grpc") == total * BLOCK_BYTES

    # the admin CLI reports the same numbers
    exe = Path(sys.executable).with_name("kvtier")
    p = subprocess.run([str(exe) if exe.exists() else shutil.which("kvtier"), "stats", "--url",
                        tier.url, "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert (st["entries"], st["evictions"], st["bytes_used"], st["capacity_bytes"]) == (
        fits, total - fits, fits * BLOCK_BYTES, 64 << 10)
    assert Scrape(port).requests("stats") == 1


@pytest.mark.redis
def test_metrics_of_a_redis_backed_tier(redis_private) -> None:
    """Occupancy comes from Redis; when Redis dies, scrapes still answer with backend_up 0."""
    port = free_port()
    args = ("--backend", "redis", "--redis-url", redis_private.url(), "--metrics-port", str(port))
    with TierProcess(extra_args=args) as tier, open_backend(tier.url) as b:
        items = _blocks(os.urandom(16), 7)
        assert b.put_many(items) == 7
        assert all(v is not None for v in b.get_many([it.key for it in items]))
        s = Scrape(port)
        assert s.get("kvtier_backend_up") == 1
        assert s.get("kvtier_entries") == 7 == redis_private.client().dbsize()
        assert s.get("kvtier_used_bytes") > 0
        assert s.get("kvtier_block_reads_total", outcome="hit") == 7
        assert s.requests("put") == 1 and s.requests("bulk_get") == 1

        redis_private.stop()
        with pytest.raises(BackendError, match="backend"):
            b.get_many([it.key for it in items])
        down = Scrape(port)  # the scrape itself still works
        assert down.get("kvtier_backend_up") == 0
        assert ("kvtier_entries", frozenset()) not in down.samples
        assert down.requests("bulk_get", "UNAVAILABLE") == 1
        assert down.get("kvtier_block_reads_total", outcome="hit") == 7


def test_metrics_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        exe = Path(sys.executable).with_name("kvtier")
        p = subprocess.run([str(exe) if exe.exists() else shutil.which("kvtier"), "serve",
                            "--port", "0", "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert f":{port}" in lines[0] and "--metrics-port" in lines[0]
