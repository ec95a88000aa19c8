"""Reference runs for hand-offs that cannot be bit-identical to a one-pass cold prefill.

A PD hand-off stops the prefill one token short (``N - 1``) and the decode node
computes the last prompt token as a one-token step, which vLLM runs through its
*decode* kernels; a cold run computes that token inside the prefill chunk. The
two round differently, so greedy tokens can drift on near-ties even when every
restored byte is exact. The fairest reference is one engine, no tier, doing the
same split: prefill ``prompt[:N-1]``, then feed ``prompt[N-1]`` as its first
decode input. :class:`ForceFirstToken` makes the engine emit a given first
token (``SamplingParams.extra_args["force_first_token"]``) so that its next
step consumes it exactly like the decode node does.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

EXTRA_ARG = "force_first_token"


class ForceFirstToken(AdapterLogitsProcessor):
    """Per-request: the first sampled token is the given id; later ones are untouched."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        token = (params.extra_args or {}).get(EXTRA_ARG)
        if token is None:
            return None
        token = int(token)

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if not output_ids:
                keep = logits[token].clone()
                logits.fill_(float("-inf"))
                logits[token] = keep
            return logits

        return force


def split_reference_prompt(prompt: list[int]) -> tuple[list[int], dict[str, Any]]:
    """(prompt to send, extra_args) for the one-engine reference of a PD hand-off.

    The reference's output starts with ``prompt[-1]``; drop it before comparing.
    """
    return prompt[:-1], {EXTRA_ARG: prompt[-1]}
