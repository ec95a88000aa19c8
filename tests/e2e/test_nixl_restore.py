"""Engines save to and restore from a real tier over NIXL (UCX, no GPU: DRAM agents).

Node A saves with NIXL writes (Reserve, WRITE, Commit) and reads through staging;
node B reads straight into its KV-cache blocks (``direct_reads``). Tokens must equal a
cold engine's, and the tier's metrics must show the bytes went over NIXL, not the bulk
port or gRPC.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.backends import open_backend
from kvtier.backends.arena import GEN_BYTES
from kvtier.keys import BlockKey, is_manifest_key
from kvtier.payload import HEADER_SIZE, PayloadError, decode
from kvtier.testing.engine_proc import EngineProcess, Generation, engine_kwargs
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import wait_until
from kvtier.transport import nixl
from tests.e2e.conftest import SAVE_TIMEOUT_S, deepest_boundary, landed

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
            # A reads through staging, B straight into its KV-cache blocks.
            "a": EngineProcess(engine_kwargs(model_path, t.url, transport="nixl",
                                             direct_reads=False), "nixl-a"),
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
    # B's KV cache is plain CPU memory: every block landed in place, none via staging.
    assert stats.get("blocks_loaded_direct", 0) == stats["blocks_loaded"]
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
        direct = s.get("blocks_loaded_direct", 0) - loaded0[name].get("blocks_loaded_direct", 0)
        assert direct == (blocks if name == "b" else 0), name  # A staged, B in place
        read += data + blocks * HEADER_SIZE
    grew = {k: moved.get(k, 0) - before.get(k, 0) for k in (("out", t) for t in
                                                             ("nixl", "tcp", "grpc"))}
    print(f"tier bytes out during the two reads: {grew}; payloads both engines loaded: {read}")
    assert grew[("out", "nixl")] == pytest.approx(read, rel=0.05)  # exact today
    assert grew[("out", "tcp")] == grew[("out", "grpc")] == 0


def test_corrupted_extent_read_in_place_is_a_miss_and_heals(nixl_cluster) -> None:
    """Payload bytes changed in the tier's memory by a NIXL WRITE (a rogue peer, a bug):
    B reads them straight into its blocks, the payload checksum refuses them there, the
    load fails and B recomputes, with cold tokens. The recompute stores good copies, and
    the next request hits in place again."""
    tier, e = nixl_cluster
    p = make_prompt_token_ids(1500, 307, 4096)
    with open_backend(tier.url, timeout_s=10) as w:
        before = {x.key for x in w.scan()}
        ref = _saved_by_a(tier, e, p)
        mine = sorted(k for k in {x.key for x in w.scan()} - before if not is_manifest_key(k))
        assert mine, "node A stored nothing"
        w.get_many(mine[:1])  # connects the NIXL route
        client, server = w._nixl._client, w._nixl._server
        r = client.locate(server, mine, time.monotonic() + 10)
        buf, addr = client._staging.get(16)
        buf[:16] = b"\xa5" * 16
        for a, n in zip(r.address, r.length):
            assert n > GEN_BYTES + HEADER_SIZE + 100
            client.agent.transfer("WRITE", client._remotes_name(server),
                                  np.array([[addr, 16]], dtype=np.uint64),
                                  np.array([[a + n - 64, 16]], dtype=np.uint64), 10)
        client._release(r.lease_id, 0)
    s0 = e["b"].connector_stats()
    out = e["b"].generate(p)
    assert out.token_ids == ref.token_ids
    s1 = e["b"].connector_stats()
    assert s1.get("error_load_invalid", 0) > s0.get("error_load_invalid", 0)
    assert s1.get("blocks_loaded_direct", 0) == s0.get("blocks_loaded_direct", 0)

    def healed() -> bool:
        with open_backend(tier.url, timeout_s=10, transport="tcp") as b:
            got = b.get_many(mine)
        try:
            for k, v in zip(mine, got):
                decode(v, BlockKey.decode(k))
        except (PayloadError, TypeError):
            return False
        return True

    wait_until(healed, SAVE_TIMEOUT_S, "B's recompute replaces the corrupt entries")
    again = e["b"].generate(p)
    assert again.num_cached_tokens == deepest_boundary(len(p))
    assert again.token_ids == ref.token_ids
    assert e["b"].connector_stats().get("blocks_loaded_direct", 0) > s1.get(
        "blocks_loaded_direct", 0)
