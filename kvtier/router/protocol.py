"""vLLM's PD protocol, as its toy proxy (tests/v1/kv_connector/nixl_integration/) speaks it.

Pure functions over request bodies, so the protocol can be checked without servers.
"""

from __future__ import annotations

import json
from typing import Any

# What a router sends a prefill node: "decode happens elsewhere, keep the KV for it".
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}


def prefill_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The prefill request: one token, not streamed, asking the connector to keep the KV.

    ``min_tokens`` would contradict ``max_tokens: 1`` and ``stream_options`` is invalid
    without streaming, so both go (as in vLLM's toy proxy); decode gets the original.
    """
    p = {k: v for k, v in body.items()
         if k not in ("stream_options", "min_tokens", "min_completion_tokens")}
    p["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    p["stream"] = False
    p["max_tokens"] = 1
    if chat or "max_completion_tokens" in body:
        p["max_completion_tokens"] = 1
    return p


def decode_body(body: dict[str, Any], prefill_response: dict[str, Any]) -> dict[str, Any]:
    """The original request plus the prefill's ``kv_transfer_params``, passed unchanged;
    without them (a connector that returns none) the decode request carries none."""
    d = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    params = prefill_response.get("kv_transfer_params")
    if params:
        d["kv_transfer_params"] = params
    return d


def affinity_text(body: dict[str, Any], chars: int) -> str | None:
    """The first ``chars`` characters of the prompt as a server would see it, or None.

    Chat messages are flattened in order (role, then text content), which follows the
    rendered template closely enough that shared system prompts and earlier turns
    share a prefix here too. Token-id prompts count 4 characters per token.
    """
    if chars <= 0:
        return None
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            parts.append(f"<{m.get('role', '')}>{content or ''}")
            if sum(map(len, parts)) >= chars:
                break
        text = "".join(parts)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # one prompt in a batch of one
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return json.dumps(prompt[: max(1, chars // 4)]) if prompt else None
        else:
            return None  # batches of prompts: no single prefix to follow
    return text[:chars] or None
