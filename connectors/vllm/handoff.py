"""PD hand-off: what a prefill node leaves in the tier for decode, and how decode finds it.

vLLM's PD protocol (its toy proxy, llm-d and other routers): the router sends the
prompt to a prefill server with ``kv_transfer_params.do_remote_decode`` and
``max_tokens`` 1, then passes the params the prefill returns, unchanged, to a
decode server. A recurrent state can only be resumed where it was written, so,
like vLLM's NixlConnector, the prefill stops one token short of the prompt
(``N - 1``): the decode node computes the last prompt token itself from the
state at ``N - 1`` and samples.

The prefill stores that *tail* in the tier: the partial attention block(s) and
every recurrent state at exactly ``N - 1`` tokens, under a content key (the
vLLM chain hash of the last full hash block, extended by the tail tokens). Any
decode node, a retried request, or the same prompt again can find it from the
tokens alone; the params only tell a decode node to expect it (and wait for an
upload that may still be in flight).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

TAIL_DOMAIN = b"kvtier-tail-v1"
PARAMS_KEY = "kvtier_handoff"


def tail_hash(block_hashes: Any, token_ids: Any, tokens: int, hash_block_size: int) -> bytes:
    """Content key of the first ``tokens`` tokens (not block-aligned).

    Chains from vLLM's hash of the last full hash block (which covers every token
    before it, extra keys included), so it is unique to that exact prefix.
    """
    full = tokens // hash_block_size
    parent = bytes(block_hashes[full - 1]) if full else b""
    tail = token_ids[full * hash_block_size:tokens]
    h = hashlib.sha256(TAIL_DOMAIN)
    h.update(len(parent).to_bytes(2, "little"))
    h.update(parent)
    h.update(len(tail).to_bytes(4, "little"))
    for t in tail:
        h.update(int(t).to_bytes(4, "little", signed=True))
    return h.digest()


def is_prefill_request(params: dict[str, Any] | None) -> bool:
    """The router asked this node to prefill for a remote decode."""
    return bool(params) and bool(params.get("do_remote_decode"))


def expected_tokens(params: dict[str, Any] | None, num_prompt_tokens: int) -> int | None:
    """Tokens a decode request's params say a prefill handed off (kvtier's or NixlConnector's).

    None when the params announce no hand-off. A count the prompt cannot hold
    (or that leaves the decode nothing to compute) is clamped to ``N - 1``.
    """
    if not params or not params.get("do_remote_prefill"):
        return None
    ours = params.get(PARAMS_KEY)
    n = ours.get("tokens") if isinstance(ours, dict) else params.get("remote_num_tokens")
    limit = num_prompt_tokens - 1
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or n > limit:
        n = limit
    return n if n > 0 else None


def prefill_params(tokens: int, handoff_id: bytes, namespace_hex: str) -> dict[str, Any]:
    """``kv_transfer_params`` a prefill returns: vLLM's PD shape plus kvtier's own entry.

    The NixlConnector fields are present (``None`` where kvtier has no peer-to-peer
    transfer) so routers that inspect them keep working.
    """
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": None,
        "remote_engine_id": None,
        "remote_request_id": None,
        "remote_host": None,
        "remote_port": None,
        "remote_num_tokens": tokens,
        PARAMS_KEY: {"id": handoff_id.hex(), "tokens": tokens, "namespace": namespace_hex},
    }


@dataclass
class HandoffWait:
    """A decode request waiting for a hand-off whose upload may still be in flight."""

    tokens: int
    deadline: float
    next_poll: float = 0.0
    done: bool = False  # loaded or given up: never wait for this request again

    @classmethod
    def start(cls, tokens: int, wait_s: float) -> HandoffWait:
        return cls(tokens, time.monotonic() + wait_s)

    def should_poll(self, interval_s: float) -> bool:
        """Rate-limits tier queries: vLLM re-asks every engine step while we wait."""
        now = time.monotonic()
        if now < self.next_poll:
            return False
        self.next_poll = now + interval_s
        return True

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline
