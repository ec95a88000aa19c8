"""The restorable-prefix lookup: the deepest boundary at which *every* group can be restored.

A hybrid request can resume at boundary ``k`` (``k * boundary_tokens`` tokens)
only if each attention-like group holds *all* of its blocks up to ``k`` and each
recurrent (state) group holds the one state written at ``k``. Attention
presence is a prefix property, so an evicted parent block caps the hit even if
later blocks or states survive: the lookup verifies instead of trusting.

The algorithm is pure: it asks a ``contains`` callable once for every key it
needs, so each backend (memory, Redis, a remote server) reuses it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from kvtier.keys import BlockKey


class GroupKind(str, Enum):
    ATTENTION = "attention"  # per-token cache: needs every block of the prefix
    STATE = "state"  # recurrent state: needs the one block at the boundary


@dataclass(frozen=True, slots=True)
class GroupQuery:
    group_id: int
    kind: GroupKind
    # How many hashes (at the request's hash granularity) one block of this group spans.
    hashes_per_block: int = 1


@dataclass(frozen=True)
class LookupQuery:
    """Everything a backend needs to answer "how deep can this request resume?"."""

    namespace: bytes
    rank: int
    hashes: Sequence[bytes]  # chained block hashes at the hash granularity
    hashes_per_boundary: int  # hashes between two restorable boundaries
    groups: Sequence[GroupQuery]
    start_boundary: int = 0  # boundaries below this are already local
    max_boundary: int | None = None  # cap (e.g. keep the last token to compute)

    def __post_init__(self) -> None:
        if self.hashes_per_boundary <= 0:
            raise ValueError("hashes_per_boundary must be positive")
        for g in self.groups:
            if g.hashes_per_block <= 0 or self.hashes_per_boundary % g.hashes_per_block:
                raise ValueError(
                    f"group {g.group_id}: hashes_per_block {g.hashes_per_block} must divide "
                    f"hashes_per_boundary {self.hashes_per_boundary}"
                )
        if self.start_boundary < 0:
            raise ValueError("start_boundary must be >= 0")

    @property
    def num_boundaries(self) -> int:
        n = len(self.hashes) // self.hashes_per_boundary
        return n if self.max_boundary is None else min(n, self.max_boundary)

    def key(self, group: GroupQuery, block_index: int) -> BlockKey:
        h = self.hashes[(block_index + 1) * group.hashes_per_block - 1]
        return BlockKey(self.namespace, self.rank, group.group_id, h)

    def blocks_at(self, group: GroupQuery, boundary: int) -> range:
        """Block indices of ``group`` that boundary ``boundary`` (1-based) adds to the previous."""
        per = self.hashes_per_boundary // group.hashes_per_block
        if group.kind is GroupKind.STATE:
            return range(boundary * per - 1, boundary * per)
        return range((boundary - 1) * per, boundary * per)


class StopReason(str, Enum):
    FULL = "full"  # every boundary that may be restored is restorable
    NOTHING_TO_LOOK_UP = "nothing_to_look_up"
    MISSING_ATTENTION = "missing_attention_block"
    MISSING_STATE = "missing_state"


@dataclass
class BoundaryDetail:
    boundary: int
    num_hashes: int
    present: dict[int, bool]  # group_id -> what this boundary needs is present
    prefix_ok: bool  # every attention block up to here present


@dataclass
class LookupResult:
    boundary: int  # deepest restorable boundary (>= start_boundary), 0 if none
    reason: StopReason
    details: list[BoundaryDetail] = field(default_factory=list)

    def hit_hashes(self, query: LookupQuery) -> int:
        return self.boundary * query.hashes_per_boundary


def deepest_restorable(
    query: LookupQuery,
    contains: Callable[[list[bytes]], Sequence[bool]],
    with_details: bool = False,
) -> LookupResult:
    """Deepest boundary > start whose every group is restorable, else ``start_boundary``."""
    start, end = query.start_boundary, query.num_boundaries
    if end <= start or not query.groups:
        return LookupResult(start, StopReason.NOTHING_TO_LOOK_UP)
    wanted: list[bytes] = []
    spans: list[list[tuple[int, int]]] = []  # per boundary: (group_id, [lo, hi) into wanted)
    for b in range(start + 1, end + 1):
        row = []
        for g in query.groups:
            lo = len(wanted)
            wanted.extend(query.key(g, i).encode() for i in query.blocks_at(g, b))
            row.append((g.group_id, lo, len(wanted)))
        spans.append(row)
    found = contains(wanted)
    kinds = {g.group_id: g.kind for g in query.groups}
    best, prefix_ok, first_gap = start, True, None
    details: list[BoundaryDetail] = []
    for i, row in enumerate(spans):
        b = start + 1 + i
        present = {gid: all(found[lo:hi]) for gid, lo, hi in row}
        attention = all(p for gid, p in present.items() if kinds[gid] is GroupKind.ATTENTION)
        states = all(p for gid, p in present.items() if kinds[gid] is GroupKind.STATE)
        prefix_ok = prefix_ok and attention
        if prefix_ok and states:
            best, first_gap = b, None
        elif first_gap is None:
            first_gap = StopReason.MISSING_STATE if prefix_ok else StopReason.MISSING_ATTENTION
        if with_details:
            details.append(BoundaryDetail(b, b * query.hashes_per_boundary, present, prefix_ok))
        elif not prefix_ok:
            break
    return LookupResult(best, first_gap or StopReason.FULL, details)
