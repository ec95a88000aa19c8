"""Real engines and a real tier server, shared across the end-to-end tests.

Engines take ~10-20 s to start, so the cold reference, node A and node B are
session-scoped; every generate() on them first empties the engine's *local*
prefix cache, so a reported hit can only come from the tier.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs  # noqa: E402
from kvtier.testing.tier_proc import TierProcess, free_port  # noqa: E402
from kvtier.testing.tiny_model import build_model  # noqa: E402

BLOCK = 384  # the tiny model's boundary (vLLM raises attention to the Mamba page)


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
