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
from tests.e2e.conftest import BLOCK

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
    hit = setup.b.generate(p)
    assert hit.num_cached_tokens == (len(p) - 1) // BLOCK * BLOCK == 1152
    assert hit.token_ids == ref.token_ids


def test_next_turn_over_redis(setup: Setup, cold):
    turn1 = prompt(700, seed=202)
    out1 = setup.a.generate(turn1, max_tokens=100)
    turn2 = turn1 + out1.token_ids + prompt(150, seed=203)
    hit = setup.b.generate(turn2)
    assert hit.num_cached_tokens == 768
    # Decode-written state: equivalent to a cold prefill up to kernel rounding
    # (see test_hybrid_restore.test_next_turn_hits_past_first_prompt).
    assert hit.token_ids[0] == cold.generate(turn2).token_ids[0]


def test_parent_deleted_behind_the_tier(setup: Setup, cold):
    """Redis evicts on its own: a missing attention block must cap the hit before it."""
    p = prompt(1600, seed=204)
    ref = cold.generate(p)
    setup.a.generate(p)
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
    if setup.server is None or not hasattr(setup.server, "restart"):
        pytest.skip("restart is exercised on standalone Redis")
    p = prompt(1300, seed=205)
    ref = cold.generate(p)
    setup.a.generate(p)
    setup.server.restart()  # comes back empty, same port
    miss = setup.b.generate(p)
    assert miss.num_cached_tokens == 0
    assert miss.token_ids == ref.token_ids
