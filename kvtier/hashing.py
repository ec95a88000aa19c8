"""Block hashes of a prompt, exactly as vLLM computes them (for explain, tests, tools).

vLLM chains one hash per ``hash_block_size`` tokens:
``h_i = H((h_{i-1} or NONE_HASH, tokens_i, extra_keys))``. kvtier keys blocks by
these hashes, so an admin tool that wants to know what a prompt would hit must
reproduce them; it uses vLLM's own functions, so it cannot drift from the engine.
Plain-text prompts (no LoRA, no multimodal inputs) only.

``NONE_HASH = H(seed)``, and in vLLM 0.32 the seed is ``PYTHONHASHSEED`` when set,
for every algorithm, sha256 included; unset, it is a fixed default for the
cryptographic algorithms and random bytes per process for the others
(``kv_cache_utils.resolve_none_hash_seed``). Engines with different seeds never
compute the same hash, so the seed (hashed) is part of every namespace.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CRYPTO_ALGOS = frozenset({"sha256", "sha256_cbor"})
DEFAULT_SEED = "vllm-none-hash"  # vLLM's DEFAULT_NONE_HASH_SEED (cryptographic algorithms)
RANDOM = "random"


@dataclass(frozen=True)
class HashSeed:
    """How an engine seeds its prefix hash, resolved the way vLLM resolves it.

    ``source`` is ``PYTHONHASHSEED``, ``default`` (unset, cryptographic algorithm)
    or ``random`` (unset, non-cryptographic: no two processes agree). ``seed`` is
    the seed itself where recording it is harmless (cryptographic algorithms,
    whose collision resistance does not rest on it), else None. ``digest`` is a
    hash of ``NONE_HASH`` (never the raw value), ``random`` when there is none.
    """

    algo: str
    source: str
    seed: str | None
    digest: str

    def describe(self) -> str:
        if self.source == RANDOM:
            return f"a random per-process seed ({self.algo} without PYTHONHASHSEED)"
        if self.source == "default":
            return "PYTHONHASHSEED unset (vLLM's fixed default seed)"
        shown = f"={self.seed}" if self.seed is not None else " (value not recorded)"
        return f"PYTHONHASHSEED{shown}"


def _hash_fn(algo: str) -> Callable[[Any], bytes]:
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
    except ImportError as e:  # pragma: no cover - vLLM is a test dependency
        raise RuntimeError("computing vLLM block hashes needs vllm installed") from e
    return get_hash_fn_by_name(algo)


def none_hash(algo: str, seed: str) -> bytes:
    """vLLM's ``NONE_HASH`` for ``seed`` (``init_none_hash`` without the global)."""
    return bytes(_hash_fn(algo)(seed))


def seed_digest(algo: str, seed: str) -> str:
    return hashlib.sha256(b"kvtier-none-hash\0" + none_hash(algo, seed)).hexdigest()[:32]


def engine_hash_seed(algo: str, env: Mapping[str, str] | None = None) -> HashSeed:
    """The seed an engine with environment ``env`` (default: this process's) hashes with."""
    env = os.environ if env is None else env
    seed = env.get("PYTHONHASHSEED")
    if seed is not None:
        return HashSeed(algo, "PYTHONHASHSEED", seed if algo in CRYPTO_ALGOS else None,
                        seed_digest(algo, seed))
    if algo in CRYPTO_ALGOS:
        return HashSeed(algo, "default", DEFAULT_SEED, seed_digest(algo, DEFAULT_SEED))
    _hash_fn(algo)  # an unknown algorithm fails here, as in the engine
    return HashSeed(algo, RANDOM, None, RANDOM)


def prompt_block_hashes(token_ids: Sequence[int], hash_block_size: int,
                        algo: str = "sha256", seed: str | None = None) -> list[bytes]:
    """One hash per full ``hash_block_size`` block of ``token_ids``, seeded with ``seed``
    (default: as an engine in this process's environment would be)."""
    if hash_block_size <= 0:
        raise ValueError("hash_block_size must be positive")
    from vllm.v1.core import kv_cache_utils as kcu

    fn = _hash_fn(algo)
    if seed is None:
        seed = kcu.resolve_none_hash_seed(fn)
    out: list[bytes] = []
    parent = none_hash(algo, seed)
    for start in range(0, len(token_ids) - hash_block_size + 1, hash_block_size):
        parent = kcu.hash_block_tokens(fn, parent, token_ids[start:start + hash_block_size], None)
        out.append(bytes(parent))
    return out
