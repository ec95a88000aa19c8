"""kvtier's default admission: the states a next request needs, and nothing dense.

Saved: the prompt's last aligned state and decode-crossed states (a chat's next
turn or a resumed request starts there), fleet junctions (the tier saw other
requests share the prefix up to there and leave it), and sparse periodic
states on long prompts, every N tokens with N sized so that states cost about
``state_share`` of the attention KV they sit on (N = state bytes / (share x KV
bytes per token)). Neutral on a miss: without a junction the chunk ends stay
vLLM's own unless vLLM can write states inside a chunk; periodic states are
otherwise admitted only where vLLM ends a chunk by itself.
"""

from __future__ import annotations

from kvtier.admission.base import AdmissionPolicy, RequestView, next_in


class Default(AdmissionPolicy):
    name = "default"

    def __init__(self, state_share: float = 0.5, min_period_boundaries: int = 1) -> None:
        if state_share <= 0:
            raise ValueError("state_share must be positive")
        self.state_share = state_share
        self.min_period_boundaries = min_period_boundaries

    def period_boundaries(self, req: RequestView) -> int:
        """N in boundaries: tokens whose KV bytes x share equal one state's bytes."""
        kv = max(req.kv_bytes_per_token, 1)
        tokens = req.state_bytes_per_boundary / (self.state_share * kv)
        return max(self.min_period_boundaries, -(-int(tokens) // req.boundary_tokens))

    def _periodic(self, req: RequestView, boundary: int) -> bool:
        return boundary % self.period_boundaries(req) == 0

    def chunk_end(self, req: RequestView, position: int) -> int | None:
        junction = next_in(req.junctions, req, position)
        if not req.in_chunk_checkpoints:
            return junction
        n = self.period_boundaries(req) * req.boundary_tokens
        periodic = (position // n + 1) * n
        if periodic > req.num_prompt_tokens:
            return junction
        return periodic if junction is None else min(junction, periodic)

    def admit_state(self, req: RequestView, boundary: int, decode: bool) -> bool:
        return (
            decode
            or boundary == req.prompt_end_boundary
            or boundary in req.junctions
            or self._periodic(req, boundary)
        )
