"""What vLLM's own prefix cache keeps in align mode: the prompt's last aligned state
and the states decode crosses; no chunk end is moved."""

from __future__ import annotations

from kvtier.admission.base import AdmissionPolicy, RequestView


class PromptEnd(AdmissionPolicy):
    name = "prompt_end"

    def chunk_end(self, req: RequestView, position: int) -> int | None:
        return None

    def admit_state(self, req: RequestView, boundary: int, decode: bool) -> bool:
        return decode or boundary == req.prompt_end_boundary
