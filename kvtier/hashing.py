"""Block hashes of a prompt, exactly as vLLM computes them (for explain, tests, tools).

vLLM chains one hash per ``hash_block_size`` tokens:
``h_i = H((h_{i-1} or NONE_HASH, tokens_i, extra_keys))``. kvtier keys blocks by
these hashes, so an admin tool that wants to know what a prompt would hit must
reproduce them; it uses vLLM's own functions, so it cannot drift from the engine.
Plain-text prompts (no LoRA, no multimodal inputs) only.
"""

from __future__ import annotations

from collections.abc import Sequence


def prompt_block_hashes(token_ids: Sequence[int], hash_block_size: int,
                        algo: str = "sha256") -> list[bytes]:
    """One hash per full ``hash_block_size`` block of ``token_ids``."""
    if hash_block_size <= 0:
        raise ValueError("hash_block_size must be positive")
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils as kcu
    except ImportError as e:  # pragma: no cover - vLLM is a test dependency
        raise RuntimeError("computing vLLM block hashes needs vllm installed") from e
    fn = get_hash_fn_by_name(algo)
    kcu.init_none_hash(fn)  # respects PYTHONHASHSEED like the engine does
    out: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - hash_block_size + 1, hash_block_size):
        parent = kcu.hash_block_tokens(fn, parent, token_ids[start:start + hash_block_size], None)
        out.append(bytes(parent))
    return out
