"""Dense checkpoints (kvtier before issue 8): a chunk end and a saved state every N boundaries."""

from __future__ import annotations

from kvtier.admission.base import AdmissionPolicy, RequestView


class Dense(AdmissionPolicy):
    """``every`` boundaries a forced chunk end; every offered state is admitted.

    ``every=0`` moves no chunk end (states only where vLLM ends chunks itself).
    """

    name = "dense"

    def __init__(self, every: int = 1) -> None:
        if every < 0:
            raise ValueError("every must be >= 0")
        self.every = every

    def chunk_end(self, req: RequestView, position: int) -> int | None:
        if self.every == 0:
            return None
        step = self.every * req.boundary_tokens
        t = (position // step + 1) * step
        return t if t <= req.num_prompt_tokens else None

    def admit_state(self, req: RequestView, boundary: int, decode: bool) -> bool:
        return True
