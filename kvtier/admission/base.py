"""The admission interface: which recurrent states the tier keeps, and where chunks end.

On a hybrid model a recurrent state at one boundary costs as much as thousands
of tokens of attention KV, so saving one at every boundary makes states most of
the bytes. A policy decides (a) where vLLM must end a prefill chunk so that a
state exists there at all, and (b) which offered states are worth saving.
Attention blocks are cheap and always saved; they are not the policy's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestView:
    """What a policy sees of one request."""

    num_prompt_tokens: int
    boundary_tokens: int  # tokens per restorable boundary (scheduler block size)
    hit_boundary: int  # boundaries restored from the tier (0 on a miss)
    junctions: tuple[int, ...]  # boundaries (1-based) the tier hints as fleet junctions
    is_pd_prefill: bool
    state_bytes_per_boundary: int  # all recurrent groups' state bytes at one boundary
    kv_bytes_per_token: int  # all attention groups' bytes per token
    in_chunk_checkpoints: bool  # vLLM can write a state inside a chunk without ending it

    @property
    def prompt_end_boundary(self) -> int:
        """The prompt's last aligned boundary (where vLLM's align mode keeps a state)."""
        return self.num_prompt_tokens // self.boundary_tokens


class AdmissionPolicy(ABC):
    """Plug-in deciding chunk ends and state admission for one deployment."""

    name: str = "abstract"

    @abstractmethod
    def chunk_end(self, req: RequestView, position: int) -> int | None:
        """Next boundary in tokens (> ``position``) at which vLLM must end a prefill chunk,
        or None to leave vLLM's scheduling alone."""

    @abstractmethod
    def admit_state(self, req: RequestView, boundary: int, decode: bool) -> bool:
        """Save the recurrent state vLLM offers at ``boundary`` (1-based boundary index)?
        ``decode`` is True for states crossed during decode."""


def next_in(boundaries: object, req: RequestView, position: int) -> int | None:
    """Smallest boundary of ``boundaries`` (1-based indices) whose token offset is
    past ``position`` and inside the prompt, in tokens; None if there is none."""
    best = None
    for b in boundaries:  # type: ignore[attr-defined]
        t = b * req.boundary_tokens
        if position < t <= req.num_prompt_tokens and (best is None or t < best):
            best = t
    return best


def make_admission(name: str, **params: object) -> AdmissionPolicy:
    """The registered policy called ``name`` built with ``params`` (e.g. ``dense``, ``every=2``)."""
    from kvtier.admission import POLICIES  # the registry imports this module

    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown admission policy {name!r}; choose one of {sorted(POLICIES)}"
        ) from None
    return cls(**params)  # type: ignore[arg-type]
