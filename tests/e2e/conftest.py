"""Real engines and a real tier server, shared across the end-to-end tests.

Engines take ~10-20 s to start, so the cold reference, node A and node B are
session-scoped; every generate() on them first empties the engine's *local*
prefix cache, so a reported hit can only come from the tier. Nothing flushes an
engine's uploads: a test that needs a save waits for the tier to hold it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs  # noqa: E402
from kvtier.testing.tier_proc import TierProcess, free_port  # noqa: E402
from kvtier.testing.tiny_model import build_model  # noqa: E402
from kvtier.testing.waits import TierWaitTimeout, wait_restorable, wait_until  # noqa: E402

# The tiny model's boundary: vLLM raises the attention block until its page holds a
# GDN state page (bf16 states in vLLM 0.32 -> 256 tokens). Checked on the engines.
BLOCK = 256
PAGE_BYTES = 512 * BLOCK  # one KV page of the tiny model (attention K+V of one block)
STATE_GROUPS = 3  # the tiny model's GDN KV-cache groups: one state each per boundary
SAVE_TIMEOUT_S = 60.0  # generous: uploads are milliseconds, but the box is shared and busy


def deepest_boundary(n_tokens: int) -> int:
    """Deepest restorable boundary vLLM accepts: it must still compute >= 1 token."""
    return (n_tokens - 1) // BLOCK * BLOCK


def decode_boundaries(prompt_tokens: int, resume: int) -> list[int]:
    """Boundaries up to ``resume`` whose blocks a turn's decode wrote (past its prompt)."""
    return [b for b in range(BLOCK, resume + 1, BLOCK) if b > prompt_tokens]


def landed(url: str, tokens: list[int], n: int) -> None:
    """Wait (from outside the engines) until ``n`` tokens of ``tokens`` are restorable."""
    wait_restorable(url, tokens, n, timeout_s=SAVE_TIMEOUT_S)


def save_until_restorable(engine: EngineProcess, url: str, tokens: list[int], n: int,
                          what: str) -> None:
    """Serve ``tokens`` on ``engine`` until the tier holds ``n`` of them.

    After an outage a connector serves without the tier for ``retry_after_s`` and
    drops saves meanwhile; a client would simply see later requests saved again.
    """
    def once() -> bool:
        engine.generate(tokens, max_tokens=1)
        try:
            wait_restorable(url, tokens, n, timeout_s=5)
            return True
        except TierWaitTimeout:
            return False

    wait_until(once, SAVE_TIMEOUT_S, what)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return build_model("tiny")


@pytest.fixture(scope="session")
def tier() -> Iterator[TierProcess]:
    with TierProcess(capacity="2GiB") as t:
        yield t


@pytest.fixture(scope="session")
def engines(model_path: Path, tier: TierProcess) -> Iterator[dict[str, EngineProcess]]:
    b_metrics = free_port()
    procs = {
        "cold": EngineProcess(engine_kwargs(model_path), "cold"),
        "a": EngineProcess(engine_kwargs(model_path, tier.url), "node-a"),
        "b": EngineProcess(engine_kwargs(model_path, tier.url, metrics_port=b_metrics), "node-b"),
    }
    procs["b"].metrics_port = b_metrics  # type: ignore[attr-defined]
    try:
        for p in procs.values():
            p.wait_ready()
        block = procs["a"].engine_stats()["block_size"]
        assert block == BLOCK, f"the engines use {block}-token blocks: set BLOCK = {block}"
        yield procs
    finally:
        for p in procs.values():
            p.close()


@pytest.fixture(scope="session")
def cold(engines: dict[str, EngineProcess]) -> EngineProcess:
    return engines["cold"]


@pytest.fixture(scope="session")
def node_a(engines: dict[str, EngineProcess]) -> EngineProcess:
    return engines["a"]


@pytest.fixture(scope="session")
def node_b(engines: dict[str, EngineProcess]) -> EngineProcess:
    return engines["b"]
