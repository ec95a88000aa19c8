"""kvtier sim: deterministic traces, a hand-checked tiny replay, the trace format, the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvtier.admission import make_admission
from kvtier.backends.eviction import make_policy
from kvtier.cli import app
from kvtier.sim import replay, report, traces
from kvtier.sim.models import MODELS, ModelSpec, get_model
from kvtier.sim.traces import Request

B = 4
TINY = ModelSpec("tiny", B, state_bytes=100, kv_bytes_per_token=1)


def tiny_trace() -> list[Request]:
    r1 = tuple(range(10))
    out1 = (50, 51, 52)
    return [
        Request(prompt_tokens=r1, output_tokens=out1),
        Request(prompt_tokens=r1 + out1 + (60, 61), output_tokens=(70,)),  # next turn
        Request(prompt_tokens=r1[:6] + (80, 81, 82, 83), output_tokens=(90,)),  # parts at 1
        Request(prompt_tokens=r1[:4] + (84, 85, 86, 87, 88), output_tokens=(91,)),
    ]


@pytest.mark.parametrize(("admission", "hits"), [
    # r1 misses; r2 extends r1's decode (state at boundary 3, crossed by decode);
    # r3 shares boundary 1 only: dense saved a state there, the others see a junction
    # and (default, marconi) end a chunk there, so r4 hits it; prompt_end never does.
    ("dense", [0, 12, 4, 4]),
    ("prompt_end", [0, 12, 0, 0]),
    ("marconi", [0, 12, 0, 4]),
    ("default", [0, 12, 0, 4]),
])
def test_tiny_trace_hits_by_hand(admission: str, hits: list[int]) -> None:
    res = replay.simulate(tiny_trace(), TINY, admission=admission)
    assert res.hits == hits
    assert res.prompt_tokens == 10 + 15 + 10 + 9


def test_tiny_trace_bytes_by_hand() -> None:
    sim = replay.Simulator(TINY, "default")
    prepared = replay.prepare(tiny_trace(), B)
    sim.step(prepared[0])
    # attention blocks 1..3 (4 tokens x 1 byte) + states at 2 (prompt end) and 3 (decode)
    assert (sim.result.upload_bytes, sim.result.written_bytes) == (3 * 4 + 2 * 100, 212)
    assert sim.result.state_written_bytes == 200
    dense = replay.Simulator(TINY, "dense")
    dense.step(prepared[0])
    assert dense.result.written_bytes == 3 * 4 + 3 * 100
    assert dense.result.chunk_ends_moved == 1  # boundary 1 (2 is the prompt's last aligned)


def test_eviction_at_small_capacity_costs_hits() -> None:
    full = replay.simulate(tiny_trace(), TINY, admission="default")
    small = replay.simulate(tiny_trace(), TINY, admission="default", capacity_bytes=120)
    assert small.hit_tokens < full.hit_tokens and small.evictions > 0


def test_generators_are_deterministic() -> None:
    for name in traces.GENERATORS:
        a, b = traces.generate(name, 40, seed=3), traces.generate(name, 40, seed=3)
        assert a == b and len(a) == 40
        assert traces.generate(name, 40, seed=4) != a
    r = traces.generate("chat", 5, seed=3)[0]
    assert r.token_ids() == traces.generate("chat", 5, seed=3)[0].token_ids()


def test_chat_turns_extend_the_previous_turn() -> None:
    reqs = traces.generate("chat", 60, seed=0)
    by_session: dict[str, list[Request]] = {}
    for r in reqs:
        by_session.setdefault(r.session, []).append(r)
    multi = [rs for rs in by_session.values() if len(rs) > 1]
    assert multi
    for rs in multi:
        for prev, nxt in zip(rs, rs[1:]):
            assert nxt.prompt[:len(prev.prompt) + 1] == (*prev.prompt, prev.output)


def test_trace_file_round_trip(tmp_path) -> None:  # noqa: ANN001
    reqs = traces.generate("mix", 30, seed=1) + tiny_trace()
    path = tmp_path / "t.jsonl"
    traces.write_trace(path, reqs)
    assert traces.read_trace(path) == reqs


def test_simulation_is_deterministic_and_policies_differ() -> None:
    model = get_model("qwen3-next-80b")
    prepared = replay.prepare(traces.generate("sysprompt", 60, seed=0), model.block_tokens)
    ws = replay.working_set_bytes(prepared, model)
    runs = [replay.Simulator(model, "default", "value", ws // 10).run(prepared).as_dict()
            for _ in range(2)]
    assert runs[0] == runs[1]
    dense = replay.Simulator(model, "dense", "lru", ws // 10).run(prepared)
    assert dense.written_bytes > runs[0]["written_bytes"]


def test_model_sizes_from_configs() -> None:
    q = MODELS["qwen3-next-80b"]
    assert q.kv_bytes_per_token == 24 * 1024
    assert 73 * (1 << 20) < q.state_bytes < 75 * (1 << 20)  # ~74 MiB (issue 8)
    assert 0.7 < q.state_share_dense < 0.8  # "roughly three quarters"
    assert set(MODELS) == {"qwen3-next-80b", "nemotron-h-56b", "qwen3.5-35b"}


def test_capacity_parsing() -> None:
    assert report.parse_capacity("20%", 1000) == 200
    assert report.parse_capacity("1KiB", 1000) == 1024
    with pytest.raises(ValueError):
        report.parse_capacity("-5%", 1000)


def test_predict_hit_tokens_for_an_engine_comparison() -> None:
    reqs = [(r.prompt_tokens, r.output_tokens) for r in tiny_trace()]
    assert replay.predict_hit_tokens(reqs, boundary_tokens=B, state_bytes_per_boundary=100,
                                     kv_bytes_per_token=1) == [0, 12, 0, 4]


def test_cli_sim_on_a_trace_file(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "t.jsonl"
    traces.write_trace(path, traces.generate("agentic", 20, seed=0))
    res = CliRunner().invoke(app, ["sim", "--trace", str(path), "--capacity", "50%",
                                   "--admission", "dense", "--eviction", "lru", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{"):])
    assert d["admission"] == "dense" and d["requests"] == 20 and d["hit_tokens"] > 0
    assert d["capacity_bytes"] == d["working_set_bytes"] // 2
    bad = CliRunner().invoke(app, ["sim", "--gen", "nope"])
    assert bad.exit_code == 2


def test_bench_admission_runs_every_config_side_by_side() -> None:
    from kvtier.benches.admission import CAPACITIES, CONFIGS, REFERENCE, run_admission_bench

    res = run_admission_bench(None, requests=30, seeds=(0, 1), traces=("sysprompt",))
    rows = res["rows"]
    assert [(r["seed"], r["capacity"], r["admission"], r["eviction"]) for r in rows] == [
        (s, c, a, e) for s in (0, 1) for c in CAPACITIES for a, e in (*CONFIGS, REFERENCE)]
    small = [r for r in rows if r["capacity"] == "5%"]
    assert all(abs(r["capacity_bytes"] - r["working_set_bytes"] / 20) <= 1 for r in small)
    # the ceiling (dense, room for everything) bounds every policy at every capacity
    assert all(r["token_hit_rate"] <= r["ceiling_hit_rate"] + 1e-12 for r in rows)
    assert any(r["token_hit_rate"] == r["ceiling_hit_rate"] for r in rows)
    assert [(c["trace"], c["capacity"]) for c in res["cells"]] == [
        ("sysprompt", c) for c in CAPACITIES]
    for c in res["cells"]:
        assert all(0 <= v["met"] <= 2 and 0 <= v["attainable"] <= 2 for v in c["goals"].values())
        assert ("2x_dense" in c["goals"]) == (c["capacity"] == "5%")


def test_clairvoyant_eviction_keeps_what_is_needed_next() -> None:
    """Belady's rule over the trace's future: of two chains, the one a later request
    needs stays, though LRU would keep the other (more recent) one."""
    from kvtier.backends.base import PutItem
    from kvtier.backends.memory import MemoryBackend
    from kvtier.keys import BlockKey
    from kvtier.sim.clairvoyant import Clairvoyant

    ns = bytes(16)
    a, b, c = b"a" * 8, b"b" * 8, b"c" * 8

    def items(h: bytes) -> list[PutItem]:
        k = BlockKey(ns, 0, 0, h).encode()
        return [PutItem(k, b"x" * 10), PutItem(BlockKey(ns, 0, 1, h).encode(), b"s" * 30, k)]

    def kept(policy: object) -> set[bytes]:
        store = MemoryBackend(80, policy=policy)  # type: ignore[arg-type]
        for i, h in enumerate((a, b, c)):
            getattr(policy, "advance", lambda _: None)(i)
            store.put_many(items(h))
        return {BlockKey.decode(e.key).block_hash for e in store.scan()
                if BlockKey.decode(e.key).group == 1}

    assert kept(Clairvoyant([[a], [b], [c], [a]])) == {a, c}
    assert kept(make_policy("lru")) == {b, c}
    # a's last use has passed, b's has not: ranks move on as the trace does
    assert kept(Clairvoyant([[a], [b], [c], [b]])) == {b, c}


@pytest.mark.parametrize(("prompt", "states"), [(8, [1, 2]), (9, [2]), (3, [])])
def test_states_exist_where_vllm_align_mode_ends_chunks(prompt: int, states: list[int]) -> None:
    """vLLM stops a prefill at the last boundary before the prompt's last token, and the
    last chunk ends at the prompt's end (a state there only if aligned)."""
    sim = replay.Simulator(TINY, make_admission("dense", every=0), save_decoded=False)
    sim.step(replay.prepare([Request(prompt_tokens=tuple(range(prompt)),
                                     output_tokens=(7,))], B)[0])
    assert sim.result.states_saved == len(states)
    assert sim.result.chunk_ends_moved == 0
    stored = {k for k in (e.key for e in sim.store.scan()) if k.split(b":")[3] == b"1"}
    assert len(stored) == len(states)
