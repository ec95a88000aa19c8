"""Time to first token: cold recompute vs a restore from the tier, in one run.

``python -m kvtier.benches.ttft`` (or ``kvtier bench ttft``) builds the bench-size
random-weight hybrid model, starts a tier server and three engines in their own
processes (cold: no connector; node A: saves; node B: restores), and times an
~8K-token prompt with one output token:
- cold prefill on the cold engine (the reference);
- node B restoring the prefix node A saved (its local prefix cache emptied),
  once the tier holds it (waited for from outside, as a client would);
- node B again with its local prefix cache warm (vLLM's own best case).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from kvtier.backends import open_backend
from kvtier.manifest import load_manifests
from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import build_model, make_prompt_token_ids
from kvtier.testing.waits import wait_restorable

PROMPT_TOKENS = 8192
REPEATS = 3


def _ttft(engine: EngineProcess, prompt: list[int], reset: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(prompt, max_tokens=1, reset_local_cache=reset)
    return time.perf_counter() - t0, out.num_cached_tokens


def _deepest_boundary(url: str, n_tokens: int) -> int:
    """What an engine may restore of an ``n_tokens`` prompt, in the tier's boundaries."""
    with open_backend(url) as b:
        (m,) = load_manifests(b).values()
    return (n_tokens - 1) // m.boundary_tokens * m.boundary_tokens


def run_ttft_bench(console: Any = None, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
    model = build_model("bench")
    extra = {"max_model_len": prompt_tokens + 512}
    with TierProcess(capacity="4GiB") as tier:
        engines = {
            "cold": EngineProcess({**engine_kwargs(model), **extra}, "ttft-cold"),
            "a": EngineProcess({**engine_kwargs(model, tier.url), **extra}, "ttft-a"),
            "b": EngineProcess({**engine_kwargs(model, tier.url), **extra}, "ttft-b"),
        }
        try:
            for e in engines.values():
                e.wait_ready()
            cold, hit, local = [], [], []
            cached = 0
            for i in range(REPEATS):
                p = make_prompt_token_ids(prompt_tokens, 1000 + i, 4096)
                cold.append(_ttft(engines["cold"], p, reset=True)[0])
                engines["a"].generate(p, max_tokens=1)
                wait_restorable(tier.url, p, _deepest_boundary(tier.url, len(p)), timeout_s=120)
                t, cached = _ttft(engines["b"], p, reset=True)
                hit.append(t)
                local.append(_ttft(engines["b"], p, reset=False)[0])
        finally:
            for e in engines.values():
                e.close()
    res = {
        "prompt_tokens": prompt_tokens, "tier_hit_tokens": cached,
        "cold_ttft_s": round(statistics.median(cold), 3),
        "tier_ttft_s": round(statistics.median(hit), 3),
        "local_cache_ttft_s": round(statistics.median(local), 3),
    }
    res["speedup_vs_cold"] = round(res["cold_ttft_s"] / res["tier_ttft_s"], 2)
    if console is not None:
        from rich.table import Table

        t = Table(title=f"TTFT, bench model, {prompt_tokens}-token prompt, median of {REPEATS}")
        t.add_column("path")
        t.add_column("TTFT", justify="right")
        t.add_column("vs cold recompute", justify="right")
        t.add_row("cold recompute (reference)", f"{res['cold_ttft_s']:.3f} s", "1.00x")
        t.add_row(f"restore from tier ({cached} tokens)", f"{res['tier_ttft_s']:.3f} s",
                  f"{res['speedup_vs_cold']:.2f}x faster")
        t.add_row("vLLM local prefix cache", f"{res['local_cache_ttft_s']:.3f} s",
                  f"{res['cold_ttft_s'] / res['local_cache_ttft_s']:.2f}x faster")
        console.print(t)
    return res


if __name__ == "__main__":
    from rich.console import Console

    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else PROMPT_TOKENS
    run_ttft_bench(Console(), tokens)
