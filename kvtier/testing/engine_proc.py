"""A real vLLM engine in its own process, driven over a local socket.

Tests and benchmarks need several independent engines ("node A", "node B",
a cold reference) that share nothing but the tier. Each runs here in a
separate Python process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the
scheduler and worker in it, so connector counters can be read back), and the
parent sends it small commands over ``multiprocessing.connection``. Nothing here
flushes the connector's background uploads: as in production, a save lands when
it lands, and a test that needs it waits for the tier (``kvtier.testing.waits``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

AUTHKEY = b"kvtier-test-engine"


def engine_kwargs(model_path: str | Path, tier_url: str | None = None,
                  **extra_connector: Any) -> dict[str, Any]:
    """Engine settings that work on CPU for the tiny hybrid model (design notes §5)."""
    kw: dict[str, Any] = dict(
        model=str(model_path), enable_prefix_caching=True, mamba_cache_mode="align",
        dtype="bfloat16", enforce_eager=True, max_model_len=4096,
        kv_cache_memory_bytes=512 << 20, seed=0,
    )
    if tier_url is not None:
        kw["kv_transfer_config"] = {
            "kv_connector": "KVTierConnector",
            "kv_connector_module_path": "kvtier.connectors.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"tier_url": tier_url, "timeout_s": 2.0,
                                          "retry_after_s": 1.0, **extra_connector},
        }
    return kw


@dataclass
class Generation:
    token_ids: list[int]
    num_cached_tokens: int
    kv_transfer_params: dict[str, Any] | None = None
    logprobs: list[float] | None = None  # of each sampled token, if asked for


class EngineProcess:
    """Parent-side handle; ``generate`` returns greedy tokens and the reported hit."""

    def __init__(self, kwargs: dict[str, Any], name: str = "engine", log_dir: str | None = None,
                 start_timeout_s: float = 300.0, launcher: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        """``launcher`` prefixes the command, e.g. ``ip netns exec NODE`` to run the
        engine on another test host (control goes over a filesystem socket); ``env``
        overrides the engine's environment (e.g. its own ``PYTHONHASHSEED``)."""
        self.name = name
        self._dir = tempfile.mkdtemp(prefix=f"kvtier-{name}-")
        sock = os.path.join(self._dir, "ctl.sock")
        self.log_path = os.path.join(log_dir or self._dir, f"{name}.log")
        listener = Listener(sock, authkey=AUTHKEY)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"), **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "kvtier.testing.engine_proc", sock],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        listener._listener._socket.settimeout(start_timeout_s)  # type: ignore[attr-defined]
        try:
            self.conn = listener.accept()
        except OSError:
            self.proc.kill()
            raise RuntimeError(f"{name} did not connect; see {self.log_path}") from None
        finally:
            listener.close()
        # The engine builds in the background: several can start at once.
        self.conn.send(("start", kwargs))
        self._ready = False
        self._start_timeout_s = start_timeout_s

    def wait_ready(self) -> EngineProcess:
        if not self._ready:
            self._recv("start", self._start_timeout_s)
            self._ready = True
        return self

    def _call(self, op: str, arg: Any = None, timeout_s: float = 600.0) -> Any:
        self.wait_ready()
        self.conn.send((op, arg))
        return self._recv(op, timeout_s)

    def _recv(self, op: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} died or hung during {op}; see {self.log_path}:\n"
                                   + self.tail())
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"{self.name}.{op} failed: {value}")
        return value

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def generate(self, prompt_token_ids: list[int], max_tokens: int = 16,
                 reset_local_cache: bool = True, logprobs: bool = False) -> Generation:
        """Greedy generation; by default the local prefix cache is emptied first,
        so any hit is the tier's."""
        return self.generate_many([prompt_token_ids], max_tokens, reset_local_cache,
                                  logprobs=logprobs)[0]

    def generate_many(self, prompts: list[list[int]], max_tokens: int = 16,
                      reset_local_cache: bool = True,
                      extra_args: list[dict[str, Any] | None] | None = None,
                      logprobs: bool = False) -> list[Generation]:
        """All prompts in one batch (they compete for KV blocks: preemption can happen).

        ``extra_args`` (one per prompt) go to ``SamplingParams.extra_args``, e.g.
        ``{"kv_transfer_params": ...}`` as vLLM's API server passes them. ``logprobs``
        also returns each sampled token's logprob (bit-exact arithmetic shows there
        before it flips a greedy token)."""
        outs = self._call("generate_many", {"prompts": prompts, "max_tokens": max_tokens,
                                            "reset": reset_local_cache, "extra": extra_args,
                                            "logprobs": logprobs})
        return [Generation(o["token_ids"], o["num_cached_tokens"], o["kv_transfer_params"],
                           o.get("logprobs")) for o in outs]

    def engine_stats(self) -> dict[str, Any]:
        """vLLM scheduler facts the tests care about: preemptions so far (and which
        request at how many output tokens), the number of KV blocks and their size in
        tokens (vLLM sizes hybrid blocks itself)."""
        return self._call("engine_stats")

    def connector_stats(self) -> dict[str, int]:
        """Scheduler + worker connector counters, as they are now: uploads run in the
        background, so save counters may still grow (wait with ``waits.wait_until``)."""
        return self._call("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.conn.send(("stop", None))
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- child side ------------------------------------------------------------------
def _child(sock: str) -> None:
    conn = Client(sock, authkey=AUTHKEY)
    llm = None
    while True:
        op, arg = conn.recv()
        try:
            if op == "stop":
                conn.close()
                os._exit(0)
            if op == "start":
                from vllm import LLM

                llm = LLM(**arg)
                _count_preemptions(llm)
                conn.send((True, None))
            elif op == "generate_many":
                from vllm import SamplingParams

                assert llm is not None
                if arg["reset"]:
                    llm.reset_prefix_cache()
                extra = arg.get("extra") or [None] * len(arg["prompts"])
                lp = 0 if arg.get("logprobs") else None
                sps = [SamplingParams(temperature=0.0, max_tokens=arg["max_tokens"],
                                      ignore_eos=True, extra_args=x, logprobs=lp)
                       for x in extra]
                outs = llm.generate([{"prompt_token_ids": p} for p in arg["prompts"]], sps,
                                    use_tqdm=False)
                conn.send((True, [{"token_ids": list(o.outputs[0].token_ids),
                                   "num_cached_tokens": int(o.num_cached_tokens or 0),
                                   "kv_transfer_params": o.kv_transfer_params,
                                   "logprobs": _sampled_logprobs(o.outputs[0])}
                                  for o in outs]))
            elif op == "engine_stats":
                conn.send((True, _engine_stats(llm)))
            elif op == "stats":
                conn.send((True, _connector_stats(llm)))
            else:
                conn.send((False, f"unknown op {op!r}"))
        except Exception as e:  # noqa: BLE001 - report to the parent, keep serving
            import traceback

            conn.send((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _sampled_logprobs(out: Any) -> list[float] | None:
    if not out.logprobs:
        return None
    return [float(lp[t].logprob) for t, lp in zip(out.token_ids, out.logprobs)]


def _worker_connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


def _count_preemptions(llm: Any) -> None:
    """Instrument (not replace) the scheduler's preemption, so tests can see it happened."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    original = sched._preempt_request
    sched._kvtier_preemptions = 0
    sched._kvtier_preempted = []  # (request id, output tokens so far), in order

    def counted(*args: Any, **kwargs: Any) -> Any:
        sched._kvtier_preemptions += 1
        req = args[0] if args else kwargs.get("request")
        if req is not None:
            sched._kvtier_preempted.append((str(req.request_id), int(req.num_output_tokens)))
        return original(*args, **kwargs)

    sched._preempt_request = counted


def _engine_stats(llm: Any) -> dict[str, Any]:
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    reqs = getattr(sched, "_kvtier_preemptions", 0)
    out: dict[str, Any] = {
        "preemptions": int(reqs), "num_blocks": int(sched.kv_cache_config.num_blocks),
        "block_size": int(sched.cache_config.block_size),
        "preempted": list(getattr(sched, "_kvtier_preempted", []))}
    side = getattr(getattr(sched, "connector", None), "_sched", None)
    if side is not None:  # what the admission policy weighs (kvtier.sim predicts with it)
        out["state_bytes_per_boundary"] = side.layout.state_bytes_per_boundary
        out["kv_bytes_per_token"] = side.layout.kv_bytes_per_token
        out["max_num_batched_tokens"] = int(sched.scheduler_config.max_num_batched_tokens)
    try:
        from kvtier.connectors.vllm.stats import ConnectorStats

        out["metrics_port"] = ConnectorStats._served_port or 0
    except ImportError:  # pragma: no cover - vLLM missing
        pass
    return out


def _connector_stats(llm: Any) -> dict[str, int]:
    stats: dict[str, int] = {}
    w = _worker_connector()
    if w is not None:
        stats.update(w.stats.snapshot())
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler.connector
        stats.update(sched.stats.snapshot())
    except AttributeError:
        pass
    return stats


if __name__ == "__main__":
    _child(sys.argv[1])
