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
    # Client side only (never sent by a tier): the tier could not be asked, an outage.
    TIER_UNAVAILABLE = "tier_unavailable"


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
    # Deepest boundary with every attention block present (>= boundary). Deeper than
    # ``boundary``: a junction, the prefix to there was shared but no state saved.
    attention_boundary: int = 0

    def __post_init__(self) -> None:
        self.attention_boundary = max(self.attention_boundary, self.boundary)

    @property
    def junction(self) -> int | None:
        """The fleet junction this lookup reveals, if any (a boundary past the hit)."""
        return self.attention_boundary if self.attention_boundary > self.boundary else None

    def hit_hashes(self, query: LookupQuery) -> int:
        return self.boundary * query.hashes_per_boundary


def deepest_restorable(
    query: LookupQuery,
    contains: Callable[[list[bytes]], Sequence[bool]],
    with_details: bool = False,
) -> LookupResult:
    """Deepest boundary > start whose every group is restorable, else ``start_boundary``.

    All keys the range needs go to ``contains`` in one batch (one round trip on
    a remote store); the rest is integer bookkeeping.
    """
    start, end = query.start_boundary, query.num_boundaries
    if end <= start or not query.groups:
        return LookupResult(start, StopReason.NOTHING_TO_LOOK_UP)
    n = end - start
    hashes = query.hashes
    wanted: list[bytes] = []
    spans = []  # (group, blocks per boundary, offset into wanted)
    for g in query.groups:
        pre = BlockKey(query.namespace, query.rank, g.group_id, b"").encode()
        hpb = g.hashes_per_block
        per = query.hashes_per_boundary // hpb
        if g.kind is GroupKind.STATE:
            idxs = range((start + 1) * per - 1, end * per, per)
        else:
            idxs = range(start * per, end * per)
        spans.append((g, per, len(wanted)))
        wanted.extend([pre + hashes[(i + 1) * hpb - 1].hex().encode() for i in idxs])
    found = contains(wanted)
    # present[g][j]: boundary start+1+j has what group g needs there.
    present: dict[int, list[bool]] = {}
    for g, per, off in spans:
        if g.kind is GroupKind.STATE:
            present[g.group_id] = list(found[off:off + n])
        else:
            present[g.group_id] = [all(found[off + j * per: off + (j + 1) * per])
                                   for j in range(n)]
    attention = [g.group_id for g in query.groups if g.kind is GroupKind.ATTENTION]
    states = [g.group_id for g in query.groups if g.kind is GroupKind.STATE]
    best, attn, prefix_ok, first_gap = start, start, True, None
    details: list[BoundaryDetail] = []
    for j in range(n):
        b = start + 1 + j
        prefix_ok = prefix_ok and all(present[gid][j] for gid in attention)
        if prefix_ok:
            attn = b
        if prefix_ok and all(present[gid][j] for gid in states):
            best, first_gap = b, None
        elif first_gap is None:
            first_gap = StopReason.MISSING_STATE if prefix_ok else StopReason.MISSING_ATTENTION
        if with_details:
            details.append(BoundaryDetail(b, b * query.hashes_per_boundary,
                                          {gid: p[j] for gid, p in present.items()}, prefix_ok))
        elif not prefix_ok:
            break
    return LookupResult(best, first_gap or StopReason.FULL, details, attention_boundary=attn)
