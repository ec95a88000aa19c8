"""``kvtier bench admission``: admission x eviction on every trace at 5/20/100% capacity.

Replays each generated trace through :mod:`kvtier.sim` (real keys, lookup,
admission and eviction code, real model sizes) for dense checkpoints + LRU
(kvtier before issue 8), prompt-end only + LRU (what vLLM's own cache keeps),
Marconi-like admission + LRU (as vLLM PR 37898 and SGLang's port evict) and
kvtier's default + value eviction, side by side. Simulated, not timed.
"""

from __future__ import annotations

from typing import Any

from kvtier.sim import report

CONFIGS = (("dense", "lru"), ("prompt_end", "lru"), ("marconi", "lru"), ("default", "value"))
CAPACITIES = ("5%", "20%", "100%")
TRACES = ("chat", "agentic", "sysprompt", "mix")


def run_admission_bench(console: Any = None, model: str = "qwen3-next-80b",
                        requests: int = 400, seed: int = 0,
                        traces: tuple[str, ...] = TRACES) -> dict:
    rows: list[dict] = []
    for name in traces:
        loaded = report.load(None, name, model, requests, seed)
        for cap in CAPACITIES:
            for adm, ev in CONFIGS:
                r = report.run(loaded, cap, adm, ev)
                r["capacity"] = cap
                rows.append(r)
    goals = _goals(rows)
    if console is not None:
        _print(console, rows, goals, model)
    return {"model": model, "requests": requests, "seed": seed, "rows": rows, "goals": goals}


def _goals(rows: list[dict]) -> dict:
    """The issue's targets, checked per trace and capacity."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(f"{r['trace']}@{r['capacity']}", {})[r["admission"]] = r
    checks = {}
    for k, by in out.items():
        d, best = by["default"], max(x["token_hit_rate"] for x in by.values())
        dense = by["dense"]
        c = {"highest_hit_rate": d["token_hit_rate"] >= best - 1e-9,
             "bytes_per_hit_le_third_dense":
                 d["bytes_per_hit_token"] <= dense["bytes_per_hit_token"] / 3}
        if k.endswith("@5%"):
            c["hit_rate_2x_dense"] = d["token_hit_rate"] >= 2 * dense["token_hit_rate"]
        checks[k] = c
    return checks


def _print(console: Any, rows: list[dict], goals: dict, model: str) -> None:
    from rich.table import Table

    t = Table(title=f"kvtier bench admission ({model}): token hit rate / bytes stored per "
                    "token hit / upload")
    t.add_column("trace")
    t.add_column("capacity", justify="right")
    for adm, ev in CONFIGS:
        t.add_column(f"{adm}+{ev}", justify="right")
    t.add_column("goals (highest, 2x@5%, <=1/3 B)")
    for i in range(0, len(rows), len(CONFIGS)):
        group = rows[i:i + len(CONFIGS)]
        r0 = group[0]
        cells = [r0["trace"], r0["capacity"]]
        cells += [f"{r['token_hit_rate']:.1%} / {r['bytes_per_hit_token'] / 1024:.0f} KiB"
                  f" / {r['upload_bytes'] / report.GIB:.0f} GiB" for r in group]
        g = goals[f"{r0['trace']}@{r0['capacity']}"]
        cells.append(" ".join(("yes" if v else "NO") for v in g.values()))
        t.add_row(*cells)
    console.print(t)


if __name__ == "__main__":  # python -m kvtier.benches.admission [--model M] [--requests N]
    import argparse

    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="qwen3-next-80b")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run_admission_bench(Console(width=200), a.model, a.requests, a.seed)
