"""Admission policies: which recurrent states to save and where prefill chunks end."""

from __future__ import annotations

from kvtier.admission.base import AdmissionPolicy, RequestView, make_admission
from kvtier.admission.default import Default
from kvtier.admission.dense import Dense
from kvtier.admission.marconi import Marconi
from kvtier.admission.prompt_end import PromptEnd

POLICIES: dict[str, type[AdmissionPolicy]] = {
    p.name: p for p in (Dense, PromptEnd, Marconi, Default)
}


__all__ = ["POLICIES", "AdmissionPolicy", "RequestView", "make_admission"]
