"""Engines save to and restore from a real tier over NIXL (UCX, no GPU: DRAM agents).

Node A saves with NIXL writes (Reserve, WRITE, Commit), node B restores with one NIXL
READ per load; tokens must equal a cold engine's, and the tier's metrics must show the
bytes went over NIXL, not the bulk port or gRPC.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.payload import HEADER_SIZE
from kvtier.testing.engine_proc import EngineProcess, Generation, engine_kwargs
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


def _saved_by_a(tier: TierProcess, e: dict[str, EngineProcess], p: list[int]) -> Generation:
    """The cold reference for a new prompt ``p``, once node A computed it (a miss, cold
    tokens) and the tier holds its deepest boundary."""
    ref = e["cold"].generate(p)
    first = e["a"].generate(p)
    assert first.num_cached_tokens == 0 and first.token_ids == ref.token_ids
    landed(tier.url, p, deepest_boundary(len(p)))
    return ref


def test_engine_restores_over_nixl_with_cold_tokens(nixl_cluster) -> None:
    tier, e = nixl_cluster
    p = make_prompt_token_ids(2000, 301, 4096)
    ref = _saved_by_a(tier, e, p)
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


def _at_once(jobs: dict[str, EngineProcess], tokens: list[int]) -> dict[str, Generation]:
    """``generate(tokens)`` on every engine from its own thread, released together."""
    gate = threading.Barrier(len(jobs))
    out: dict[str, Generation] = {}

    def run(name: str, engine: EngineProcess) -> None:
        gate.wait()
        out[name] = engine.generate(tokens)  # empties its local prefix cache first

    threads = [threading.Thread(target=run, args=kv) for kv in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == set(jobs), "an engine's generate raised (see the thread's traceback)"
    return out


def test_two_engines_read_the_same_boundary_over_nixl_at_once(nixl_cluster) -> None:
    """A saves a prompt; then A (its local prefix cache emptied) and B restore it from
    the tier at the same time: both hit the deepest boundary with cold tokens, and the
    tier served both reads' payloads (header + data) over NIXL, nothing else."""
    tier, e = nixl_cluster
    p = make_prompt_token_ids(1800, 303, 4096)
    ref = _saved_by_a(tier, e, p)
    before = _tier_bytes(tier.metrics_port)
    loaded0 = {n: e[n].connector_stats() for n in ("a", "b")}
    got = _at_once({"a": e["a"], "b": e["b"]}, p)
    moved = _tier_bytes(tier.metrics_port)
    read = 0
    for name, g in got.items():
        assert g.num_cached_tokens == deepest_boundary(len(p)) > 0, name
        assert g.token_ids == ref.token_ids, name
        s = e[name].connector_stats()
        blocks = s.get("blocks_loaded", 0) - loaded0[name].get("blocks_loaded", 0)
        data = s.get("bytes_loaded", 0) - loaded0[name].get("bytes_loaded", 0)
        assert blocks > 0, f"{name} loaded nothing"
        read += data + blocks * HEADER_SIZE
    grew = {k: moved.get(k, 0) - before.get(k, 0) for k in (("out", t) for t in
                                                             ("nixl", "tcp", "grpc"))}
    print(f"tier bytes out during the two reads: {grew}; payloads both engines loaded: {read}")
    assert grew[("out", "nixl")] == pytest.approx(read, rel=0.05)  # exact today
    assert grew[("out", "tcp")] == grew[("out", "grpc")] == 0
