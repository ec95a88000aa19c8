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
- a decode node that prefills cold (the prompt sent straight to it, fresh);
- vLLM's own NixlConnector run the same way (prefill ``kv_producer`` and decode
  ``kv_consumer`` API servers, the same router, the same prompts), after the kvtier
  servers are stopped: router and decode TTFT, and what its decode node computed.

Each decode node's computed prompt tokens per hand-off come from vLLM's
``vllm:prompt_tokens_by_source_total`` (``local_compute``). NIXL agents run with
their UCX progress thread off (:mod:`kvtier.testing.nixl_no_progress_thread`; with
it on, each spins a core even idle) and OpenMP bound around vLLM's NIXL core pinning
(:func:`_nixl_env`); the idle CPU of the NIXL servers is printed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from kvtier.testing.api_server import ApiServer, kv_transfer_config, server_args
from kvtier.testing.router_proc import RouterProcess
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.testing.tiny_model import build_model, make_prompt_token_ids

PROMPT_TOKENS = 8192
REPEATS = 3
NIXL_HOOK = Path(__file__).resolve().parents[1] / "testing" / "nixl_no_progress_thread"
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


def nixl_connector_config(kv_role: str) -> dict[str, Any]:
    """vLLM's NixlConnector as it works on this CPU box (design notes §7)."""
    return {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu",
            "kv_connector_extra_config": {"backends": ["UCX"]}}


def _nixl_env() -> dict[str, str]:
    """Per engine: its own NIXL side channel, the hook that turns the progress thread off,
    and OpenMP kept off the last core.

    On CPU, vLLM's NIXL worker pins the thread that builds it (the engine's main thread,
    which is also OpenMP's thread 0) to the last core, reserved "for kv transfer"; with
    the default binding OpenMP's last thread is bound there too and the two spin on each
    other's barriers (seen here: both on core 1, prefill stalled for minutes). Binding
    OpenMP to the other cores leaves the main thread alone on the last one.
    """
    path = os.pathsep.join(p for p in (str(NIXL_HOOK), os.environ.get("PYTHONPATH")) if p)
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "PYTHONPATH": path,
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[:-1] or cores))}


def _idle_cpu(server: ApiServer, seconds: float = 5.0) -> float | None:
    """Percent of one core the server's process tree burns while it serves nothing."""
    try:
        import psutil
    except ImportError:
        return None
    procs = [psutil.Process(server.proc.pid)] if server.proc else []
    procs += [c for p in procs for c in p.children(recursive=True)]

    def busy() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    b0 = busy()
    time.sleep(seconds)
    return round(100 * (busy() - b0) / seconds, 1)


def _computed(before: dict[str, float], after: dict[str, float], n: int) -> float:
    """Prompt tokens the decode node computed itself per hand-off, over ``n`` hand-offs."""
    return round((after.get("local_compute", 0) - before.get("local_compute", 0)) / n, 1)


def _handoffs(p: ApiServer, d: ApiServer, model: str, prompt_tokens: int,
              rows: dict[str, list[float]]) -> float:
    """Router and decode-alone TTFT for REPEATS fresh prompts (the same seeds for every
    connector); returns the decode node's computed prompt tokens per hand-off."""
    with RouterProcess([p.url], [d.url], "--prefill-timeout", "600",
                       "--decode-timeout", "600") as router:
        router.wait_health(lambda status, _: status == 200)
        before = d.prompt_tokens_by_source()
        for i in range(REPEATS):
            prompt = make_prompt_token_ids(prompt_tokens, 5000 + i, 4096)
            rows["router"].append(_ttft(router.url, model, prompt))
            other = make_prompt_token_ids(prompt_tokens, 6000 + i, 4096)
            params = _prefill(p.url, model, other)
            rows["decode"].append(_ttft(d.url, model, other, kv_transfer_params=params))
        return _computed(before, d.prompt_tokens_by_source(), 2 * REPEATS)


def _serve(servers: dict[str, ApiServer]) -> str:
    for s in servers.values():
        s.start()
    for s in servers.values():
        s.wait_ready(900)
    return httpx.get(f"{servers['decode'].url}/v1/models").json()["data"][0]["id"]


def _run_kvtier(model_path: Path, prompt_tokens: int) -> dict[str, Any]:
    mml = prompt_tokens + 512
    rows: dict[str, list[float]] = {"router": [], "decode": [], "local": [], "cold": []}
    from kvtier.transport import nixl

    # As ``kvtier serve`` runs by default: the hand-off moves over NIXL where it imports.
    with TierProcess(capacity="4GiB", nixl=nixl.available()) as tier:
        servers = {
            "prefill": ApiServer(server_args(model_path, kv_transfer_config(
                tier.url, "kv_producer"), max_model_len=mml), "bench-prefill"),
            "decode": ApiServer(server_args(model_path, kv_transfer_config(
                tier.url, "kv_consumer", handoff_wait_s=10.0), max_model_len=mml),
                "bench-decode"),
        }
        try:
            model = _serve(servers)
            d = servers["decode"]
            computed = _handoffs(servers["prefill"], d, model, prompt_tokens, rows)
            for i in range(REPEATS):
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
    return {**{f"{k}_ttft_s": round(statistics.median(v), 3) for k, v in rows.items()},
            "decode_computed_per_handoff": computed, "decode_prompt_tokens_by_source": by_source}


def _run_nixl(model_path: Path, prompt_tokens: int) -> dict[str, Any]:
    """The same hand-offs through vLLM's NixlConnector; ``{"not_run": reason}`` if it fails."""
    try:
        import nixl._api  # noqa: F401
    except ImportError as e:
        return {"not_run": f"nixl not importable ({e})"}
    mml = prompt_tokens + 512
    servers = {role: ApiServer(server_args(model_path, nixl_connector_config(kv_role),
                                           max_model_len=mml), f"bench-nixl-{role}",
                               env=_nixl_env())
               for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer"))}
    rows: dict[str, list[float]] = {"router": [], "decode": []}
    try:
        model = _serve(servers)
        d = servers["decode"]
        computed = _handoffs(servers["prefill"], d, model, prompt_tokens, rows)
        idle = {role: _idle_cpu(s) for role, s in servers.items()}
        return {**{f"{k}_ttft_s": round(statistics.median(v), 3) for k, v in rows.items()},
                "decode_computed_per_handoff": computed,
                "decode_prompt_tokens_by_source": d.prompt_tokens_by_source(),
                "idle_cpu_pct_of_a_core": idle, "progress_thread": False,
                "omp_bind": servers["decode"].env["VLLM_CPU_OMP_THREADS_BIND"]}
    except (RuntimeError, httpx.HTTPError) as e:
        return {"not_run": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        for s in servers.values():
            s.stop()


def run_pd_bench(console: Any = None, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
    model_path = build_model("bench")
    res: dict[str, Any] = {"prompt_tokens": prompt_tokens, "repeats": REPEATS,
                           **_run_kvtier(model_path, prompt_tokens)}
    res["decode_vs_local_cache"] = round(res["decode_ttft_s"] / res["local_ttft_s"], 2)
    res["router_vs_cold"] = round(res["router_ttft_s"] / res["cold_ttft_s"], 2)
    nixl = res["nixl_connector"] = _run_nixl(model_path, prompt_tokens)
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
                  f"{res['decode_vs_local_cache']:.2f}x of a local hit (goal <= 1.2); computes "
                  f"{res['decode_computed_per_handoff']:g} prompt tokens")
        t.add_row("decode node, local prefix-cache hit (reference)",
                  f"{res['local_ttft_s']:.3f} s", "")
        t.add_row("decode node prefilling cold (reference)", f"{res['cold_ttft_s']:.3f} s", "")
        if "not_run" in nixl:
            t.add_row("vLLM NixlConnector P2P", "not run", nixl["not_run"])
        else:
            t.add_row("vLLM NixlConnector: router, prefill + P2P pull + decode",
                      f"{nixl['router_ttft_s']:.3f} s", "UCX progress thread off")
            t.add_row("vLLM NixlConnector: decode node", f"{nixl['decode_ttft_s']:.3f} s",
                      f"{nixl['decode_ttft_s'] / res['local_ttft_s']:.2f}x of a local hit; "
                      f"computes {nixl['decode_computed_per_handoff']:g} prompt tokens")
        console.print(t)
        console.print(f"decode node's vllm:prompt_tokens_by_source_total: kvtier "
                      f"{res['decode_prompt_tokens_by_source']}, NixlConnector "
                      f"{nixl.get('decode_prompt_tokens_by_source')}")
        if "idle_cpu_pct_of_a_core" in nixl:
            console.print(f"NixlConnector servers idle CPU (% of a core, progress thread off): "
                          f"{nixl['idle_cpu_pct_of_a_core']}")
    return res


if __name__ == "__main__":
    from rich.console import Console

    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else PROMPT_TOKENS
    run_pd_bench(Console(), tokens)
