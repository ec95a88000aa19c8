"""Fleet-wide junctions on real engines sharing one tier server.

The tier sees attention blocks that several requests share even when they ran on
different engines. When a lookup finds every attention block of a prefix up to
boundary k but no state there, k is a junction: the default admission moves that
request's chunk end to k and saves the state written there, so the next request
through the junction hits at k on any node. Chunk ends moved on such a request
are the only ones the default policy moves.
"""

from __future__ import annotations

import zlib

import pytest

from kvtier.sim.replay import predict_hit_tokens
from kvtier.testing.engine_proc import EngineProcess
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import wait_restorable, wait_until
from tests.e2e.conftest import BLOCK, SAVE_TIMEOUT_S, deepest_boundary, landed

pytestmark = pytest.mark.engine


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, 4096)


def test_third_request_through_a_junction_hits_there_on_another_node(cold, node_a, node_b,
                                                                     tier):
    """A runs P+X, B runs P+Y (its lookup sees P's attention blocks but no state: a
    junction; B saves the state there), C runs P+Z and hits at P's last boundary."""
    shared = prompt(1000, seed=701)  # junction at 1000 // BLOCK boundaries
    junction = 1000 // BLOCK * BLOCK
    px, py, pz = (shared + prompt(500, seed=s) for s in (702, 703, 704))
    a = node_a.generate(px)
    assert a.num_cached_tokens == 0 and a.token_ids == cold.generate(px).token_ids
    landed(tier.url, px, deepest_boundary(len(px)))  # A saved its prompt-end state only

    hints = node_b.connector_stats().get("junction_hints", 0)
    b = node_b.generate(py)
    assert b.num_cached_tokens == 0, "no state at the junction yet: a miss"
    assert b.token_ids == cold.generate(py).token_ids
    assert node_b.connector_stats().get("junction_hints", 0) == hints + 1
    wait_restorable(tier.url, py, junction, timeout_s=SAVE_TIMEOUT_S)

    c = node_a.generate(pz)  # local cache emptied: the hit is the tier's
    assert c.num_cached_tokens == junction > 0
    assert c.token_ids == cold.generate(pz).token_ids, "a prefill-written junction state"


def test_agentic_loop_hits_past_the_previous_request(node_a, node_b, tier):
    """Request n+1 = request n + its output + tool output. Node A runs the loop; node B
    serves each next request from the tier and must resume past request n's prompt,
    at the deepest boundary request n computed (its decode-crossed state). Reference:
    node A's own local hit of the same decode-written blocks (README "Decode-written
    blocks": equivalent to a cold prefill, not bit-identical)."""
    req = prompt(700, seed=710)
    out = node_a.generate(req, max_tokens=100)
    for step in range(3):
        computed = len(req) + len(out.token_ids) - 1  # the last sampled token has no KV yet
        nxt = req + out.token_ids + prompt(150, seed=711 + step)
        resume = min(computed // BLOCK * BLOCK, deepest_boundary(len(nxt)))
        assert resume > len(req), "decode crosses a boundary in every step"
        landed(tier.url, nxt, resume)
        hit = node_b.generate(nxt, max_tokens=100)
        assert hit.num_cached_tokens == resume, f"step {step}: resumes past request n"
        local = node_a.generate(nxt, max_tokens=100, reset_local_cache=False)
        assert local.num_cached_tokens == resume
        assert hit.token_ids == local.token_ids, f"step {step}"
        req, out = nxt, local


# A short mixed trace in kvtier.sim's segment form (equal names, equal tokens; a
# request's output segment is what the engine generates, of that length):
# three users of one system prompt, a three-turn chat, a three-step tool loop.
TRACE: list[tuple[tuple[str, ...], tuple[str, int]]] = [
    (("sys", "q1"), ("a1", 40)),
    (("c.u0",), ("c.a0", 120)),
    (("tools", "task"), ("call0", 60)),
    (("sys", "q2"), ("a2", 40)),
    (("c.u0", "c.a0", "c.u1"), ("c.a1", 120)),
    (("tools", "task", "call0", "tool0"), ("call1", 60)),
    (("sys", "q3"), ("a3", 40)),
    (("c.u0", "c.a0", "c.u1", "c.a1", "c.u2"), ("c.a2", 16)),
    (("tools", "task", "call0", "tool0", "call1", "tool1"), ("call2", 16)),
    (("sys", "q2", "a2", "q2b"), ("a2b", 16)),
]
SEGMENTS = {"sys": 700, "q1": 100, "q2": 120, "q3": 90, "q2b": 60, "c.u0": 500, "c.u1": 150,
            "c.u2": 80, "tools": 900, "task": 100, "tool0": 300, "tool1": 200}


def saves_landed(engine: EngineProcess) -> None:
    """Wait until every block the engine's connector planned to save was stored (or
    failed, which the caller's comparison then shows)."""
    def done() -> bool:
        s = engine.connector_stats()
        ended = s.get("blocks_saved", 0) + sum(v for k, v in s.items()
                                                if k.startswith("error_save"))
        return ended >= s.get("save_blocks_planned", 0)

    wait_until(done, SAVE_TIMEOUT_S, f"{engine.name}'s saves land in the tier")


def test_mixed_trace_hits_what_the_simulator_predicts(node_a):
    """Item 5: the default policy on the real engine restores, request by request,
    exactly the tokens kvtier.sim predicts for the same token ids (same lookup,
    admission and align-mode chunking code; no eviction at this size)."""
    tokens = {n: make_prompt_token_ids(k, zlib.crc32(n.encode()), 4096)
              for n, k in SEGMENTS.items()}
    ran, hits = [], []
    for segs, (out_name, out_len) in TRACE:
        p = [t for n in segs for t in tokens[n]]
        saves_landed(node_a)  # the simulator sees every earlier save before a lookup
        g = node_a.generate(p, max_tokens=out_len)
        tokens[out_name] = g.token_ids
        ran.append((p, g.token_ids))
        hits.append(g.num_cached_tokens)
    es = node_a.engine_stats()
    predicted = predict_hit_tokens(
        ran, boundary_tokens=BLOCK, state_bytes_per_boundary=es["state_bytes_per_boundary"],
        kv_bytes_per_token=es["kv_bytes_per_token"], chunk_tokens=es["max_num_batched_tokens"])
    assert hits == predicted
    assert sum(hits) > 0 and hits.count(0) < len(hits) - 3, hits
