"""Idle CPU of a real vLLM engine with the connector on NIXL, beside one without it.

The issue's goal (< 2% of a core) is about what NIXL adds to an engine: UCX's progress
thread would spin a core even with nothing to move. Both engines run the tiny model in
the same run and are measured over the same window, so the connector's share is the
difference; the tier's idle share is measured alongside (its agent has a peer now).
The connector engine first saves and restores one prompt, and the tier's NIXL byte
counters must show both went over NIXL (the route is connected, not merely offered).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import psutil

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.testing.tiny_model import build_model, make_prompt_token_ids
from kvtier.testing.waits import scrape_metrics, wait_restorable

PROMPT_TOKENS = 600  # two boundaries of the tiny model (256-token blocks)
VOCAB = 4096


def _tree_cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def idle_cpu_shares(pids: dict[str, int], seconds: float = 5.0) -> dict[str, float]:
    """Each pid's CPU share (of one core) with all its children, over one shared window."""
    trees = {}
    for name, pid in pids.items():
        root = psutil.Process(pid)
        trees[name] = [root, *root.children(recursive=True)]
    c0 = {n: _tree_cpu_s(t) for n, t in trees.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    c1 = {n: _tree_cpu_s(t) for n, t in trees.items()}
    dt = time.monotonic() - t0
    return {n: (c1[n] - c0[n]) / dt for n in trees}


def _nixl_bytes(port: int, direction: str) -> float:
    key = ("kvtier_bytes_total", (("direction", direction), ("transport", "nixl")))
    return scrape_metrics(port).get(key, 0.0)


def run_engine_idle_bench(seconds: float = 5.0, settle_s: float = 3.0) -> dict[str, Any]:
    """Start a tier with NIXL, an engine with the connector on it (``transport="nixl"``)
    and a plain engine; serve one prompt on each (the connector's saved, then restored,
    over NIXL); after ``settle_s`` measure all three idle over ``seconds``."""
    model = build_model("tiny")
    mport = free_port()
    prompt = make_prompt_token_ids(PROMPT_TOKENS, 7001, VOCAB)
    with TierProcess(capacity="1GiB", nixl=True, extra_args=("--metrics-port", str(mport))) as t:
        engines = {"nixl": EngineProcess(engine_kwargs(model, t.url, transport="nixl"),
                                         "idle-nixl"),
                   "plain": EngineProcess(engine_kwargs(model), "idle-plain")}
        try:
            for e in engines.values():
                e.wait_ready()
            block = engines["nixl"].engine_stats()["block_size"]
            boundary = (len(prompt) - 1) // block * block
            engines["plain"].generate(prompt, max_tokens=4)
            engines["nixl"].generate(prompt, max_tokens=4)
            wait_restorable(t.url, prompt, boundary, timeout_s=60)
            hit = engines["nixl"].generate(prompt, max_tokens=4)  # local cache emptied first
            assert hit.num_cached_tokens == boundary, (
                f"{hit.num_cached_tokens} tokens hit, not {boundary}: "
                f"{engines['nixl'].connector_stats()}\n{engines['nixl'].tail()}")
            moved = {d: _nixl_bytes(mport, d) for d in ("in", "out")}
            assert moved["in"] > 0 and moved["out"] > 0, f"NIXL was not used: {moved}"
            time.sleep(settle_s)  # past the loads, uploads and the server's progress window
            shares = idle_cpu_shares({"engine_nixl": engines["nixl"].proc.pid,
                                      "engine_plain": engines["plain"].proc.pid,
                                      "server": t.proc.pid}, seconds)  # type: ignore[union-attr]
        finally:
            for e in engines.values():
                e.close()
    shares["connector_extra"] = shares["engine_nixl"] - shares["engine_plain"]
    return {"idle_cpu": shares, "seconds": seconds, "nixl_bytes": moved}


def describe(res: dict[str, Any]) -> str:
    s = res["idle_cpu"]
    return (f"idle CPU of engines over {res['seconds']:.0f} s: with the connector on NIXL "
            f"{s['engine_nixl']:.2%} of a core, without {s['engine_plain']:.2%} -> NIXL "
            f"connector adds {s['connector_extra']:+.2%} (goal < 2%); its tier "
            f"{s['server']:.2%}")


def add_engine_idle(res: dict[str, Any], console: Any = None) -> None:
    """``kvtier bench nixl``'s engine row: ``res["engine_idle"]`` (None without vLLM)."""
    if importlib.util.find_spec("vllm") is None:
        res["engine_idle"] = None
        line = "idle CPU of engines: skipped (vLLM not installed)"
    else:
        res["engine_idle"] = run_engine_idle_bench()
        line = describe(res["engine_idle"])
    if console is not None:
        console.print(line)


if __name__ == "__main__":
    print(describe(run_engine_idle_bench()))
