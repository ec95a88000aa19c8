"""The vertical slice over Redis: the connector talking to Redis (standalone and
Cluster) directly, and through a tier server backed by Redis.

Each kind gets its own pair of engines (node A saves, node B restores); node B
always starts from an empty local prefix cache, so every hit is the tier's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.backends import open_backend
from kvtier.hashing import prompt_block_hashes
from kvtier.keys import BlockKey, is_manifest_key, manifest_key
from kvtier.manifest import NamespaceManifest
from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.redis_servers import redis_cluster, redis_standalone
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import wait_until
from tests.e2e.conftest import (
    BLOCK,
    SAVE_TIMEOUT_S,
    decode_boundaries,
    deepest_boundary,
    landed,
    save_until_restorable,
)
from tests.e2e.tier_contents import decode_flagged_blocks

pytestmark = [pytest.mark.engine, pytest.mark.redis]


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, 4096)


class Setup:
    def __init__(self, url: str, a: EngineProcess, b: EngineProcess, server=None):
        self.url, self.a, self.b, self.server = url, a, b, server


@pytest.fixture(scope="module", params=["redis", "redis-cluster", "tier-on-redis"])
def setup(request, model_path: Path, tmp_path_factory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp(request.param)
    ctx = redis_cluster(base) if request.param == "redis-cluster" else redis_standalone(base)
    with ctx as server:
        tier = None
        url = server.url()
        if request.param == "tier-on-redis":
            tier = TierProcess(extra_args=("--backend", "redis", "--redis-url", url)).start()
            url = tier.url
        a = EngineProcess(engine_kwargs(model_path, url), f"{request.param}-a")
        b = EngineProcess(engine_kwargs(model_path, url), f"{request.param}-b")
        try:
            a.wait_ready()
            b.wait_ready()
            yield Setup(url, a, b, server)
        finally:
            a.close()
            b.close()
            if tier is not None:
                tier.stop()


def test_restore_across_engines(setup: Setup, cold):
    p = prompt(1500, seed=201)
    ref = cold.generate(p)
    assert setup.a.generate(p).token_ids == ref.token_ids
    landed(setup.url, p, deepest_boundary(len(p)))
    hit = setup.b.generate(p)
    assert hit.num_cached_tokens == deepest_boundary(len(p)) > 0
    assert hit.token_ids == ref.token_ids


def test_next_turn_over_redis(setup: Setup, cold):
    """Turn 2 on B from the state A's decode wrote. Reference: A itself serving
    turn 2 from its local prefix cache, i.e. vLLM's own hit of the same decode-written
    blocks (a cold prefill rounds differently: see
    test_hybrid_restore.test_next_turn_hits_past_first_prompt)."""
    turn1 = prompt(700, seed=202)
    out1 = setup.a.generate(turn1, max_tokens=100)
    assert out1.token_ids == cold.generate(turn1, max_tokens=100).token_ids
    turn2 = turn1 + out1.token_ids + prompt(150, seed=203)
    resume = deepest_boundary(len(turn2))
    assert resume > len(turn1), "turn 2 must resume past turn 1's prompt"
    landed(setup.url, turn2, resume)
    hit = setup.b.generate(turn2)
    assert hit.num_cached_tokens == resume
    local = setup.a.generate(turn2, reset_local_cache=False)  # A ran nothing since turn 1
    assert local.num_cached_tokens == resume, "the reference must hit the same boundary"
    assert hit.token_ids == local.token_ids
    flagged = decode_boundaries(len(turn1), resume)
    assert decode_flagged_blocks(setup.url, turn2[:resume]) == {"attention": flagged,
                                                                 "state": flagged}


def test_parent_deleted_behind_the_tier(setup: Setup, cold):
    """Redis evicts on its own: a missing attention block must cap the hit before it."""
    p = prompt(1600, seed=204)
    ref = cold.generate(p)
    setup.a.generate(p)
    landed(setup.url, p, deepest_boundary(len(p)))
    # The default admission saved p's prompt-end state only; a request sharing p's first
    # boundary makes it a junction, so a state exists there too.
    setup.a.generate(p[:300] + prompt(300, seed=205))
    landed(setup.url, p[:BLOCK + 1], BLOCK)
    with open_backend(setup.url) as tier:
        manifests = [NamespaceManifest.from_bytes(v) for v in tier.get_many(
            [e.key for e in tier.scan(b"kvt1:") if is_manifest_key(e.key)]) if v]
        assert len(manifests) == 1, "one engine layout, one namespace"
        m = manifests[0]
        ns = bytes.fromhex(m.namespace)
        assert tier.contains_many([manifest_key(ns)]) == [True]
        hashes = prompt_block_hashes(p, m.hash_block_size, m.hash_algo)
        attn = next(g for g in m.groups if g.kind == "attention")
        keys = [BlockKey(ns, 0, attn.group_id, h).encode() for h in hashes]
        assert all(tier.contains_many(keys)), "kvtier's hashes must be vLLM's"
        assert tier.delete_many([keys[1]]) == 1  # the parent of boundaries 2, 3, 4
    hit = setup.b.generate(p)
    assert hit.num_cached_tokens == BLOCK
    assert hit.token_ids == ref.token_ids


def test_redis_restarted_empty_between_engines(setup: Setup, cold):
    """Redis (every Cluster node; the one under the tier server) comes back empty on the
    same address: a miss with cold tokens, then the connectors regain it -- saves
    land again and a load hits them."""
    p = prompt(1300, seed=205)
    ref = cold.generate(p)
    setup.a.generate(p)
    full = deepest_boundary(len(p))
    landed(setup.url, p, full)
    setup.server.restart()
    miss = setup.b.generate(p)
    assert (miss.num_cached_tokens, miss.token_ids) == (0, ref.token_ids)
    save_until_restorable(setup.a, setup.url, p, full, "node A saves to the restarted Redis")

    def b_hits() -> bool:
        out = setup.b.generate(p)
        assert out.token_ids == ref.token_ids
        return out.num_cached_tokens == full

    wait_until(b_hits, SAVE_TIMEOUT_S, "node B hits the restarted Redis")
