"""Marconi-like admission (Marconi, MLSys 2025), as vLLM PR 37898 adapts it to align mode.

States only where reuse is likely: the sequence's last states (the prompt's
last aligned boundary and the boundaries decode crosses: what a chat's next
turn extends) and shared prefixes, detected when attention blocks hit past the
deepest state (a junction): the chunk ends there so that state is written once.
No periodic states. (Marconi's own eviction is FLOP-aware; vLLM's and SGLang's
ports keep LRU.)
"""

from __future__ import annotations

from kvtier.admission.base import AdmissionPolicy, RequestView, next_in


class Marconi(AdmissionPolicy):
    name = "marconi"

    def chunk_end(self, req: RequestView, position: int) -> int | None:
        return next_in(req.junctions, req, position)

    def admit_state(self, req: RequestView, boundary: int, decode: bool) -> bool:
        return decode or boundary == req.prompt_end_boundary or boundary in req.junctions
