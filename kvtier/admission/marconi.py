"""Marconi-like admission (Marconi, MLSys 2025; vLLM PR 37898).

States only where reuse is likely: at branch points (junctions: a prefix other
requests already share and leave) and at the sequence's end (the state after
its decode, which a follow-up turn extends). Chunks end at junctions so the
branch-point state exists. No prompt-end state on a fresh prompt: Marconi waits
for a second request to reveal the branch point.
"""

from __future__ import annotations

from kvtier.admission.base import AdmissionPolicy, RequestView, next_in


class Marconi(AdmissionPolicy):
    name = "marconi"

    def chunk_end(self, req: RequestView, position: int) -> int | None:
        return next_in(req.junctions, req, position)

    def admit_state(self, req: RequestView, boundary: int, decode: bool) -> bool:
        return decode or boundary in req.junctions
