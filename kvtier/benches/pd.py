"""PD time to first token as a client sees it, through ``kvtier router``, in one run.

``python -m kvtier.benches.pd [PROMPT_TOKENS]`` (or ``kvtier bench pd``) builds the
bench-size random-weight hybrid model and starts a tier, a prefill API server
(``kv_producer``), a decode API server (``kv_consumer``) and the router, all real
processes. For fresh ~8K-token prompts it measures, streaming, the time to the
first token:
- through the router (prefill, hand-off over the tier, decode): what a user sees;
- decode's share: the decode request alone, sent with the prefill's params;
- the reference a decode node must beat: the same decode server answering the
  same prompt again from its *local* prefix cache (vLLM's own best case);
- a decode node that prefills cold (the prompt sent straight to it, fresh).
vLLM's NixlConnector is not run here: it needs ``nixl`` (not installed by the
set-up) and its UCX progress threads spin a core each on this 2-core machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import httpx

from kvtier.testing.api_server import ApiServer, kv_transfer_config, server_args
from kvtier.testing.router_proc import RouterProcess
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import build_model, make_prompt_token_ids

PROMPT_TOKENS = 8192
REPEATS = 3
PD_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
             "remote_block_ids": None, "remote_host": None, "remote_port": None}


def _ttft(url: str, model: str, prompt: list[int], **extra: Any) -> float:
    """Seconds to the first streamed token."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True, **extra}
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def _prefill(url: str, model: str, prompt: list[int]) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": dict(PD_PARAMS)})
    r.raise_for_status()
    return r.json()["kv_transfer_params"]


def run_pd_bench(console: Any = None, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
    model_path = build_model("bench")
    mml = prompt_tokens + 512
    with TierProcess(capacity="4GiB") as tier:
        servers = {
            "prefill": ApiServer(server_args(model_path, kv_transfer_config(
                tier.url, "kv_producer"), max_model_len=mml), "bench-prefill"),
            "decode": ApiServer(server_args(model_path, kv_transfer_config(
                tier.url, "kv_consumer", handoff_wait_s=10.0), max_model_len=mml),
                "bench-decode"),
        }
        for s in servers.values():
            s.start()
        try:
            for s in servers.values():
                s.wait_ready(900)
            p, d = servers["prefill"], servers["decode"]
            model = httpx.get(f"{d.url}/v1/models").json()["data"][0]["id"]
            with RouterProcess([p.url], [d.url], "--prefill-timeout", "600",
                               "--decode-timeout", "600") as router:
                router.wait_health(lambda status, _: status == 200)
                rows: dict[str, list[float]] = {"router": [], "decode": [], "local": [],
                                                "cold": []}
                for i in range(REPEATS):
                    prompt = make_prompt_token_ids(prompt_tokens, 5000 + i, 4096)
                    rows["router"].append(_ttft(router.url, model, prompt))
                    other = make_prompt_token_ids(prompt_tokens, 6000 + i, 4096)
                    params = _prefill(p.url, model, other)
                    rows["decode"].append(_ttft(d.url, model, other, kv_transfer_params=params))
                    # A fresh prompt straight to the decode node: cold; vLLM keeps a
                    # hybrid prompt's last aligned state from its second pass, so the
                    # third is its local prefix-cache hit.
                    fresh = make_prompt_token_ids(prompt_tokens, 7000 + i, 4096)
                    rows["cold"].append(_ttft(d.url, model, fresh))
                    _ttft(d.url, model, fresh)
                    rows["local"].append(_ttft(d.url, model, fresh))
                by_source = d.prompt_tokens_by_source()
        finally:
            for s in servers.values():
                s.stop()
    res: dict[str, Any] = {"prompt_tokens": prompt_tokens, "repeats": REPEATS,
                           **{f"{k}_ttft_s": round(statistics.median(v), 3)
                              for k, v in rows.items()},
                           "decode_prompt_tokens_by_source": by_source,
                           "nixl_connector": "not run (nixl not installed here)"}
    res["decode_vs_local_cache"] = round(res["decode_ttft_s"] / res["local_ttft_s"], 2)
    res["router_vs_cold"] = round(res["router_ttft_s"] / res["cold_ttft_s"], 2)
    if console is not None:
        from rich.table import Table

        t = Table(title=f"PD TTFT, bench model, {prompt_tokens}-token prompt, median of "
                        f"{REPEATS} (streaming, client side)")
        t.add_column("path")
        t.add_column("TTFT", justify="right")
        t.add_column("note")
        t.add_row("router: prefill + tier hand-off + decode", f"{res['router_ttft_s']:.3f} s",
                  f"{res['router_vs_cold']:.2f}x of a cold decode node")
        t.add_row("decode node, hand-off loaded from the tier", f"{res['decode_ttft_s']:.3f} s",
                  f"{res['decode_vs_local_cache']:.2f}x of a local hit (goal <= 1.2)")
        t.add_row("decode node, local prefix-cache hit (reference)",
                  f"{res['local_ttft_s']:.3f} s", "")
        t.add_row("decode node prefilling cold (reference)", f"{res['cold_ttft_s']:.3f} s", "")
        t.add_row("vLLM NixlConnector P2P", "not run", "nixl not installed here")
        console.print(t)
        console.print(f"decode node's vllm:prompt_tokens_by_source_total: {by_source}")
    return res


if __name__ == "__main__":
    from rich.console import Console

    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else PROMPT_TOKENS
    run_pd_bench(Console(), tokens)
