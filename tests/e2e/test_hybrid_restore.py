"""The vertical slice on real parts: vLLM engines in separate processes, a real tier server.

Correctness is measured in tokens: every request served from the tier must
give the cold run's greedy tokens, and report the hit vLLM was told.
"""

from __future__ import annotations

import threading
import time

import pytest

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.testing.tiny_model import make_prompt_token_ids
from tests.e2e.conftest import BLOCK

pytestmark = pytest.mark.engine
VOCAB = 4096


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, VOCAB)


def deepest_boundary(n_tokens: int) -> int:
    """Deepest restorable boundary vLLM accepts: it must still compute >= 1 token."""
    return (n_tokens - 1) // BLOCK * BLOCK


def test_second_engine_restores_deepest_boundary(cold, node_a, node_b):
    p = prompt(2000, seed=101)
    ref = cold.generate(p)
    first = node_a.generate(p)
    assert first.num_cached_tokens == 0, "a fresh prompt cannot hit"
    assert first.token_ids == ref.token_ids
    before = node_b.connector_stats().get("lookup_hit", 0)
    hit = node_b.generate(p)
    assert hit.num_cached_tokens == deepest_boundary(len(p)) == 1920
    assert hit.token_ids == ref.token_ids
    stats = node_b.connector_stats()
    assert stats["lookup_hit"] == before + 1
    assert stats.get("blocks_loaded", 0) > 0


def test_next_turn_hits_past_first_prompt(cold, node_a, node_b, tier):
    """Turn 2 resumes from the state turn 1's *decode* wrote at 768.

    That state is exactly what node A computed, but decode kernels round
    differently from a cold prefill of the same tokens (about 0.5% relative on a
    GDN state, measured), so later tokens may drift from a cold run on near-ties.
    The tier marks such blocks (FLAG_DECODE); the first token must still agree,
    and a restore of prefill-written blocks must be token-identical (other tests).
    """
    turn1 = prompt(700, seed=102)
    out1 = node_a.generate(turn1, max_tokens=120)  # decode crosses the 768 boundary
    assert out1.token_ids == cold.generate(turn1, max_tokens=120).token_ids
    turn2 = turn1 + out1.token_ids + prompt(200, seed=103)
    ref = cold.generate(turn2)
    hit = node_b.generate(turn2)
    assert hit.num_cached_tokens == 768 > len(turn1), "decode-written state must be reusable"
    assert hit.token_ids[0] == ref.token_ids[0]
    assert decode_flagged_blocks(tier.url, turn2[:768]) == {"attention": [1], "state": [1]}


def decode_flagged_blocks(url: str, tokens: list[int]) -> dict[str, list[int]]:
    """Which block indices of ``tokens`` the tier holds as decode-written, by kind."""
    from kvtier import payload
    from kvtier.backends import open_backend
    from kvtier.hashing import prompt_block_hashes
    from kvtier.keys import BlockKey, is_manifest_key
    from kvtier.manifest import NamespaceManifest

    with open_backend(url) as b:
        (m,) = [NamespaceManifest.from_bytes(bytes(v)) for v in b.get_many(
            [e.key for e in b.scan(b"kvt1:") if is_manifest_key(e.key)])]
        hashes = prompt_block_hashes(tokens, m.hash_block_size, m.hash_algo)
        out: dict[str, list[int]] = {"attention": [], "state": []}
        for g in m.groups:
            keys = [BlockKey(bytes.fromhex(m.namespace), 0, g.group_id, h).encode()
                    for h in hashes]
            for i, v in enumerate(b.get_many(keys)):
                decode = v is not None and payload.read_header(v).flags & payload.FLAG_DECODE
                if decode and i not in out[g.kind]:
                    out[g.kind].append(i)
    return out


def test_shared_prefix_hits_last_common_boundary(cold, node_a, node_b):
    p = prompt(2000, seed=104)
    node_a.generate(p)
    q = p[:1000] + prompt(600, seed=105)  # diverges inside the third block
    hit = node_b.generate(q)
    assert hit.num_cached_tokens == 768
    assert hit.token_ids == cold.generate(q).token_ids


def test_corrupt_block_is_a_miss_not_wrong_tokens(cold, node_a, node_b, tier):
    from kvtier import payload
    from kvtier.backends import open_backend
    from kvtier.backends.base import PutItem
    from kvtier.keys import BlockKey, is_manifest_key

    p = prompt(1200, seed=106)
    ref = cold.generate(p)
    with open_backend(tier.url) as backend:
        before = {e.key for e in backend.scan()}
        node_a.generate(p)
        mine = sorted({e.key for e in backend.scan()} - before)
        mine = [k for k in mine if not is_manifest_key(k)]  # this prompt's blocks
        assert mine, "node A stored nothing"
        for k, v in zip(mine, backend.get_many(mine)):
            raw = bytearray(v)
            raw[-1] ^= 0xFF  # one flipped bit-pattern in the data region
            with pytest.raises(payload.PayloadError):
                payload.decode(bytes(raw), BlockKey.decode(k))
            backend.delete_many([k])
            assert backend.put_many([PutItem(k, bytes(raw))]) == 1
    errors_before = node_b.connector_stats().get("error_load_invalid", 0)
    out = node_b.generate(p)
    assert out.token_ids == ref.token_ids
    assert node_b.connector_stats().get("error_load_invalid", 0) > errors_before
    # The corrupt blocks it tried were dropped and the recompute stored good
    # copies in their place: the tier heals, the next request is a clean hit.
    def valid(k: bytes, v) -> bool:  # noqa: ANN001
        try:
            payload.decode(v, BlockKey.decode(k))
            return True
        except payload.PayloadError:
            return False

    with open_backend(tier.url) as backend:
        assert sum(valid(k, v) for k, v in zip(mine, backend.get_many(mine))) >= 6
    healed = node_b.generate(p)
    assert healed.num_cached_tokens == 1152
    assert healed.token_ids == ref.token_ids


def test_tier_down_at_start_and_killed_mid_run(model_path, cold):
    port = free_port()
    tier = TierProcess(port=port)
    p = prompt(1500, seed=107)
    ref = cold.generate(p)
    long_p = prompt(2500, seed=108)
    long_ref = cold.generate(long_p, max_tokens=300)
    # The tier is not running when the engine starts.
    with EngineProcess(engine_kwargs(model_path, tier.url), "node-c") as c:
        out = c.generate(p)
        assert (out.num_cached_tokens, out.token_ids) == (0, ref.token_ids)
        # Once the tier comes up the engine starts using it (after its back-off).
        tier.start()
        try:
            time.sleep(1.5)
            c.generate(p)
            again = c.generate(p)
            assert again.num_cached_tokens == deepest_boundary(len(p))
            assert again.token_ids == ref.token_ids
            # Killed while the engine is busy: the request still completes, cold-identical.
            result: dict = {}
            worker = threading.Thread(
                target=lambda: result.update(out=c.generate(long_p, max_tokens=300)))
            worker.start()
            time.sleep(0.5)
            tier.kill()
            worker.join(timeout=300)
            assert result["out"].token_ids == long_ref.token_ids
        finally:
            tier.kill()
        # And with the tier gone for good the engine keeps serving, as misses.
        after = c.generate(p)
        assert (after.num_cached_tokens, after.token_ids) == (0, ref.token_ids)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_connector_metrics_count_hits_and_misses(node_a, node_b):
    """Known sequence on node B: one miss (fresh prompt), then one hit of 1152 tokens."""
    # The port actually served (the configured one can be taken by the time the engine binds).
    port = node_b.engine_stats()["metrics_port"]
    assert port in (node_b.metrics_port, node_b.metrics_port + 1)
    before = scrape(port)
    p = prompt(1300, seed=109)
    node_b.generate(p)  # nothing stored yet: a miss; B saves it
    node_b.generate(p)  # local cache emptied: the tier's hit
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("kvtier_connector_lookups_total", outcome="hit", reason="hit") == 1
    assert delta("kvtier_connector_lookups_total", outcome="miss",
                 reason="missing_attention_block") == 1
    assert delta("kvtier_connector_tokens_total", direction="hit") == 1152
    assert delta("kvtier_connector_tokens_total", direction="saved") == 1152
    assert delta("kvtier_connector_blocks_total", direction="loaded") == 3 + 3  # 3 attn + 3 states
    assert delta("kvtier_connector_bytes_total", direction="loaded") > 0
    assert delta("kvtier_connector_seconds_count", op="load") == 1


def test_preempted_requests_resume_with_batch_identical_tokens(model_path, tier, cold):
    """A KV cache too small for the batch forces vLLM to preempt and resume requests
    while the connector is saving and loading; every output must equal the same
    batch on a cold engine (batched decode rounds differently from single requests,
    so the reference is the batch, not each prompt alone)."""
    kw = engine_kwargs(model_path, tier.url)
    kw.update(kv_cache_memory_bytes=40 * 196_608, max_model_len=2048)  # 40 blocks
    prompts = [prompt(1200, seed=300 + i) for i in range(4)]
    ref = cold.generate_many(prompts, max_tokens=300)
    with EngineProcess(kw, "node-small") as small:
        outs = small.generate_many(prompts, max_tokens=300)
        assert small.engine_stats()["preemptions"] >= 1, "the test must actually preempt"
        stats = small.connector_stats()
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert not any(k.startswith("error_") for k in stats), stats
