"""A corrupt tier heals through the saves of the recomputes it causes.

The loader deletes only the blocks it tried; every other bad state stays in the
tier until a save replaces it (``kvtier.payload.put_verdict``). Here the
states both shallower and deeper than a failed load are corrupt: the recomputes
of the requests that hit them store sound copies over them, and every boundary
restores again with a cold run's tokens. The engine checkpoints densely
(``checkpoint_every=1``) so one prompt stores a state at every boundary; the
default admission's states are healed the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvtier import payload
from kvtier.backends import open_backend
from kvtier.backends.base import Backend, PutItem
from kvtier.hashing import prompt_block_hashes
from kvtier.keys import BlockKey
from kvtier.manifest import load_manifests
from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import wait_restorable
from tests.e2e.conftest import BLOCK

pytestmark = pytest.mark.engine
HEAL_TIMEOUT_S = 60.0


def _state_keys(b: Backend, tokens: list[int]) -> dict[int, list[bytes]]:
    """Keys of every state group's block at each boundary (1-based) of ``tokens``."""
    for m in load_manifests(b).values():
        hashes = prompt_block_hashes(tokens, m.hash_block_size, m.hash_algo)
        ns = bytes.fromhex(m.namespace)
        out: dict[int, list[bytes]] = {}
        for g in m.groups:
            if g.kind != "state":
                continue
            per = g.block_size // m.hash_block_size
            for i in range(len(hashes) // per):
                out.setdefault(i + 1, []).append(
                    BlockKey(ns, 0, g.group_id, hashes[(i + 1) * per - 1]).encode())
        if out and all(b.contains_many(out[1])):
            return out
    raise AssertionError("no namespace of this tier holds the prompt's states")


def _sound(b: Backend, keys: list[bytes]) -> bool:
    def ok(k: bytes, v: bytes | None) -> bool:
        try:
            return v is not None and payload.decode(v, BlockKey.decode(k)) is not None
        except payload.PayloadError:
            return False

    return all(ok(k, v) for k, v in zip(keys, b.get_many(keys)))


@pytest.fixture(scope="module")
def dense(model_path, tier) -> Iterator[EngineProcess]:
    """Writer and reader at once (every generate empties its local prefix cache)."""
    with EngineProcess(engine_kwargs(model_path, tier.url, checkpoint_every=1),
                       "heal-dense") as e:
        yield e.wait_ready()


def test_corrupt_states_around_failed_loads_are_healed(cold, dense, tier):
    node_a = node_b = dense
    sizes = {1: BLOCK + 100, 2: 2 * BLOCK + 100, 4: 4 * BLOCK + 100, 5: 5 * BLOCK + 80}
    p = make_prompt_token_ids(sizes[5], 9101, 4096)  # states at boundaries 1..5
    q = p[:sizes[2]]  # the same prefix, shorter: its lookup stops at boundary 2
    refs = {n: cold.generate(p[:n]).token_ids for n in sizes.values()}
    node_a.generate(p)
    wait_restorable(tier.url, p, 5 * BLOCK, timeout_s=HEAL_TIMEOUT_S)
    bad = (1, 2, 4, 5)  # states 1 and 4 are never loaded below; 2 and 5 are
    with open_backend(tier.url) as b:
        states = _state_keys(b, p)
        assert _sound(b, [k for ks in states.values() for k in ks])
        for boundary in bad:
            for k, v in zip(states[boundary], b.get_many(states[boundary])):
                raw = bytearray(v)
                raw[-1] ^= 0xFF
                b.delete_many([k])
                assert b.put_many([PutItem(k, bytes(raw))]) == 1
        assert not any(_sound(b, states[boundary]) for boundary in bad)
        replaced_before = b.stats().extra.get("replaced", 0)
    invalid_before = node_b.connector_stats().get("error_load_invalid", 0)

    # q's load (state 2) fails; its recompute saves state 1 (shallower) and 2 again.
    out = node_b.generate(q)
    assert out.token_ids == refs[sizes[2]]
    # p's load (state 5) fails; its recompute saves state 4 (deeper than q's load).
    out = node_b.generate(p)
    assert out.token_ids == refs[sizes[5]]
    assert node_b.connector_stats().get("error_load_invalid", 0) >= invalid_before + 2

    deadline = time.monotonic() + HEAL_TIMEOUT_S
    with open_backend(tier.url) as b:
        while not _sound(b, [k for ks in states.values() for k in ks]):
            assert time.monotonic() < deadline, {
                boundary: _sound(b, ks) for boundary, ks in states.items()}
            time.sleep(0.2)
        # states 1 and 4 were replaced in place (2 and 5 were deleted, then stored)
        assert b.stats().extra["replaced"] >= replaced_before + 2 * len(states[1])
    for boundary, n in sizes.items():
        out = node_a.generate(p[:n])
        assert (out.num_cached_tokens, out.token_ids) == (boundary * BLOCK, refs[n]), boundary
