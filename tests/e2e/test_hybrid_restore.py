"""The vertical slice on real parts: vLLM engines in separate processes, a real tier server.

Correctness is measured in tokens: every request served from the tier must
give the cold run's greedy tokens, and report the hit vLLM was told.
"""

from __future__ import annotations

import pytest

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import scrape_metrics, wait_until
from tests.e2e.conftest import (
    BLOCK,
    PAGE_BYTES,
    SAVE_TIMEOUT_S,
    STATE_GROUPS,
    decode_boundaries,
    deepest_boundary,
    landed,
    save_until_restorable,
)
from tests.e2e.tier_contents import decode_flagged_blocks

pytestmark = pytest.mark.engine
VOCAB = 4096


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, VOCAB)


def test_second_engine_restores_deepest_boundary(cold, node_a, node_b, tier):
    p = prompt(2000, seed=101)
    ref = cold.generate(p)
    first = node_a.generate(p)
    assert first.num_cached_tokens == 0, "a fresh prompt cannot hit"
    assert first.token_ids == ref.token_ids
    landed(tier.url, p, deepest_boundary(len(p)))
    before = node_b.connector_stats().get("lookup_hit", 0)
    hit = node_b.generate(p)
    assert hit.num_cached_tokens == deepest_boundary(len(p)) > 0
    assert hit.token_ids == ref.token_ids
    stats = node_b.connector_stats()
    assert stats["lookup_hit"] == before + 1
    assert stats.get("blocks_loaded", 0) > 0


def test_next_turn_hits_past_first_prompt(cold, node_a, node_b, tier):
    """Turn 2 resumes on node B from the state turn 1's *decode* wrote on node A.

    Reference: node A serving turn 2 right after turn 1 with its local prefix cache
    kept, i.e. vLLM's own hit of the very same decode-written blocks. A cold prefill
    is no fair reference for turn 2: decode kernels round differently from a cold
    prefill of the same tokens (README "Decode-written blocks"), so greedy tokens
    may drift from it on near-ties. Turn 1 itself is compared with a cold run.
    """
    turn1 = prompt(700, seed=102)
    out1 = node_a.generate(turn1, max_tokens=120)  # decode crosses a boundary
    assert out1.token_ids == cold.generate(turn1, max_tokens=120).token_ids
    turn2 = turn1 + out1.token_ids + prompt(200, seed=103)
    resume = deepest_boundary(len(turn2))
    assert resume > len(turn1), "turn 2 must resume past turn 1's prompt"
    landed(tier.url, turn2, resume)
    hit = node_b.generate(turn2)
    assert hit.num_cached_tokens == resume, "decode-written state must be reusable"
    # Node A has run nothing since turn 1: its local cache still holds turn 1's blocks.
    local = node_a.generate(turn2, reset_local_cache=False)
    assert local.num_cached_tokens == resume, "the reference must hit the same boundary"
    assert hit.token_ids == local.token_ids
    flagged = decode_boundaries(len(turn1), resume)
    assert decode_flagged_blocks(tier.url, turn2[:resume]) == {"attention": flagged,
                                                                "state": flagged}


def test_shared_prefix_hits_last_common_boundary(cold, node_a, node_b, tier):
    """The default admission saves p's prompt-end state, not one at every boundary:
    the first request sharing only part of p finds the shared attention blocks without
    a state (a junction), misses and saves the state there; the next one hits at the
    last common boundary. Dense checkpoints hit at once (test_options, checkpoint_every)."""
    p = prompt(2000, seed=104)
    node_a.generate(p)
    landed(tier.url, p, deepest_boundary(len(p)))
    shared = 1000 // BLOCK * BLOCK
    q = p[:1000] + prompt(600, seed=105)  # diverges inside a block
    first = node_b.generate(q)
    assert first.num_cached_tokens == 0
    assert first.token_ids == cold.generate(q).token_ids
    landed(tier.url, q, shared)
    r = p[:1000] + prompt(600, seed=106)
    hit = node_a.generate(r)
    assert hit.num_cached_tokens == shared
    assert hit.token_ids == cold.generate(r).token_ids


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
        landed(tier.url, p, deepest_boundary(len(p)))
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
    # The recompute stores good copies over every corrupt one (those it tried to load
    # were dropped; a save replaces the others): the tier heals, the next request hits.
    def valid(k: bytes, v) -> bool:  # noqa: ANN001
        try:
            payload.decode(v, BlockKey.decode(k))
            return True
        except payload.PayloadError:
            return False

    def valid_copies() -> int:
        with open_backend(tier.url) as backend:
            return sum(valid(k, v) for k, v in zip(mine, backend.get_many(mine)))

    wait_until(lambda: valid_copies() == len(mine), SAVE_TIMEOUT_S,
               f"node B's recompute replaces all {len(mine)} corrupt entries")
    healed = node_b.generate(p)
    assert healed.num_cached_tokens == deepest_boundary(len(p))
    assert healed.token_ids == ref.token_ids


def test_tier_down_at_start_then_up_then_gone(model_path, cold):
    """An engine started before its tier serves cold, uses the tier once it is up,
    and serves cold again once it is gone. (A tier killed while a load is in flight:
    test_multinode, which can slow the tier's network down to catch the load.)"""
    tier = TierProcess()
    p = prompt(1500, seed=107)
    ref = cold.generate(p)
    with EngineProcess(engine_kwargs(model_path, tier.url), "node-c") as c:
        out = c.generate(p)
        assert (out.num_cached_tokens, out.token_ids) == (0, ref.token_ids)
        tier.start()
        try:
            save_until_restorable(c, tier.url, p, deepest_boundary(len(p)),
                                  "node C saves once the tier is up")
            again = c.generate(p)
            assert again.num_cached_tokens == deepest_boundary(len(p))
            assert again.token_ids == ref.token_ids
        finally:
            tier.kill()
        after = c.generate(p)
        assert (after.num_cached_tokens, after.token_ids) == (0, ref.token_ids)


def test_connector_metrics_count_hits_and_misses(node_b, tier):
    """Known sequence on node B: one miss (fresh prompt), then one hit."""
    # The port actually served (the configured one can be taken by the time the engine binds).
    port = node_b.engine_stats()["metrics_port"]
    assert port in (node_b.metrics_port, node_b.metrics_port + 1)
    before = scrape_metrics(port)
    p = prompt(1300, seed=109)
    hit, saved = deepest_boundary(len(p)), len(p) // BLOCK * BLOCK
    node_b.generate(p)  # nothing stored yet: a miss; B saves it
    landed(tier.url, p, hit)
    node_b.generate(p)  # local cache emptied: the tier's hit
    after: dict = {}

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    def saved_all() -> bool:
        after.update(scrape_metrics(port))
        return delta("kvtier_connector_tokens_total", direction="saved") >= saved

    wait_until(saved_all, SAVE_TIMEOUT_S, f"node B counts the {saved} tokens it saved")

    assert delta("kvtier_connector_lookups_total", outcome="hit", reason="hit") == 1
    assert delta("kvtier_connector_lookups_total", outcome="miss",
                 reason="missing_attention_block") == 1
    assert delta("kvtier_connector_tokens_total", direction="hit") == hit
    assert delta("kvtier_connector_tokens_total", direction="saved") == saved
    # attention blocks up to the hit, and the state of each GDN group at it
    assert delta("kvtier_connector_blocks_total", direction="loaded") == hit // BLOCK + STATE_GROUPS
    assert delta("kvtier_connector_bytes_total", direction="loaded") > 0
    assert delta("kvtier_connector_seconds_count", op="load") == 1


def test_preempted_requests_resume_with_batch_identical_tokens(model_path, tier):
    """A KV cache too small for the batch forces vLLM to preempt and resume requests
    while the connector is saving and loading. Reference: the same batch on the same
    small cache without the connector (vLLM's own preemption; it preempts at the same
    points). Every token before the first preemption, and every token of a request
    never preempted, must be identical. A resumed request continues from a restored
    decode-written state plus a prefill of its last tokens, while vLLM alone
    recomputes them by prefill: equivalent, not bit-identical (README "Decode-written
    blocks"); measured, the preempted request drifts from either reference within a
    token of its preemption, and vLLM alone drifts from a cold engine the same way."""
    kw = engine_kwargs(model_path, tier.url)
    kw.update(kv_cache_memory_bytes=40 * PAGE_BYTES, max_model_len=2048)  # 40 blocks
    ref_kw = {k: v for k, v in kw.items() if k != "kv_transfer_config"}
    prompts = [prompt(1200, seed=300 + i) for i in range(4)]
    with EngineProcess(kw, "node-small") as small, \
            EngineProcess(ref_kw, "small-no-connector") as plain:
        outs = small.generate_many(prompts, max_tokens=300)
        ref = plain.generate_many(prompts, max_tokens=300)
        preempted = small.engine_stats()["preempted"]
        assert preempted, "the test must actually preempt"
        assert plain.engine_stats()["preemptions"] >= 1
        stats = small.connector_stats()
    first = min(n for _, n in preempted)
    assert all(len(o.token_ids) == 300 for o in outs)
    assert [o.token_ids[:first] for o in outs] == [r.token_ids[:first] for r in ref]
    identical = sum(o.token_ids == r.token_ids for o, r in zip(outs, ref))
    assert identical >= len(prompts) - len({rid for rid, _ in preempted}), (identical, preempted)
    assert not any(k.startswith("error_") for k in stats), stats
    # Fresh prompts cannot hit on admission: every load is a resumed request's.
    assert stats.get("requests_loaded", 0) >= 1 and stats.get("blocks_loaded", 0) > 0, stats
