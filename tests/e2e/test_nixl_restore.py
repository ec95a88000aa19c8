"""Engines save to and restore from a real tier over NIXL (UCX, no GPU: DRAM agents).

Node A saves with NIXL writes (Reserve, WRITE, Commit), node B restores with one NIXL
READ per load; tokens must equal a cold engine's, and the tier's metrics must show the
bytes went over NIXL, not the bulk port or gRPC.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.transport import nixl
from tests.e2e.conftest import deepest_boundary, landed

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not nixl.available(), reason="nixl not installed")]


def _tier_bytes(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.labels["direction"], s.labels["transport"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "kvtier_bytes_total"}


@pytest.fixture(scope="module")
def nixl_cluster(model_path) -> Iterator[tuple[TierProcess, dict[str, EngineProcess]]]:
    mport = free_port()
    with TierProcess(capacity="2GiB", nixl=True, extra_args=("--metrics-port", str(mport))) as t:
        t.metrics_port = mport  # type: ignore[attr-defined]
        procs = {
            "cold": EngineProcess(engine_kwargs(model_path), "cold"),
            "a": EngineProcess(engine_kwargs(model_path, t.url, transport="nixl"), "nixl-a"),
            "b": EngineProcess(engine_kwargs(model_path, t.url, transport="nixl"), "nixl-b"),
        }
        try:
            for p in procs.values():
                p.wait_ready()
            yield t, procs
        finally:
            for p in procs.values():
                p.close()


def test_engine_restores_over_nixl_with_cold_tokens(nixl_cluster) -> None:
    tier, e = nixl_cluster
    p = make_prompt_token_ids(2000, 301, 4096)
    ref = e["cold"].generate(p)
    first = e["a"].generate(p)
    assert first.num_cached_tokens == 0 and first.token_ids == ref.token_ids
    landed(tier.url, p, deepest_boundary(len(p)))
    saved = _tier_bytes(tier.metrics_port)
    assert saved.get(("in", "nixl"), 0) > 0, f"node A's saves did not go over NIXL: {saved}"
    hit = e["b"].generate(p)
    assert hit.num_cached_tokens == deepest_boundary(len(p)) > 0
    assert hit.token_ids == ref.token_ids
    stats = e["b"].connector_stats()
    assert stats.get("blocks_loaded", 0) > 0
    moved = _tier_bytes(tier.metrics_port)
    print(f"tier bytes by (direction, transport): {moved}")
    assert moved.get(("out", "nixl"), 0) > 0
    assert moved.get(("out", "tcp"), 0) == moved.get(("out", "grpc"), 0) == 0
