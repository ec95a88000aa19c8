"""deepest_restorable: the deepest boundary at which every group of a hybrid model is restorable."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest

from kvtier.keys import BlockKey, Namespace
from kvtier.lookup import (
    BoundaryDetail,
    GroupKind,
    GroupQuery,
    LookupQuery,
    StopReason,
    deepest_restorable,
)

NS = Namespace("tiny-qwen3next", "layout-fp").id
ATTN = 3
STATES = (0, 1, 2)
# Qwen3-Next-like: three recurrent-state (GDN) groups and one full-attention group.
GROUPS = [GroupQuery(g, GroupKind.STATE) for g in STATES] + [GroupQuery(ATTN, GroupKind.ATTENTION)]


def _hashes(n: int, seed: bytes = b"root") -> list[bytes]:
    out, h = [], seed
    for i in range(n):
        h = hashlib.sha256(h + i.to_bytes(4, "little")).digest()
        out.append(h)
    return out


class Store:
    """A dict-backed ``contains`` that counts its calls."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()
        self.calls = 0
        self.asked: list[list[bytes]] = []

    def add(self, group: int, h: bytes, rank: int = 0, ns: bytes = NS) -> None:
        self.keys.add(BlockKey(ns, rank, group, h).encode())

    def discard(self, group: int, h: bytes) -> None:
        self.keys.discard(BlockKey(NS, 0, group, h).encode())

    def contains(self, keys: list[bytes]) -> list[bool]:
        self.calls += 1
        self.asked.append(list(keys))
        return [k in self.keys for k in keys]


def _fill(store: Store, hashes: Sequence[bytes], n_boundaries: int,
          states_at: Sequence[int] | None = None, hpb: int = 1,
          groups: Sequence[GroupQuery] = GROUPS) -> None:
    """Attention blocks up to ``n_boundaries``; every state group at ``states_at`` (1-based)."""
    states_at = range(1, n_boundaries + 1) if states_at is None else states_at
    for g in groups:
        per = hpb // g.hashes_per_block
        if g.kind is GroupKind.ATTENTION:
            for i in range(n_boundaries * per):
                store.add(g.group_id, hashes[(i + 1) * g.hashes_per_block - 1])
        else:
            for b in states_at:
                store.add(g.group_id, hashes[b * hpb - 1])


def _q(hashes: Sequence[bytes], **kw: object) -> LookupQuery:
    kw.setdefault("groups", GROUPS)
    kw.setdefault("hashes_per_boundary", 1)
    return LookupQuery(NS, 0, hashes, **kw)  # type: ignore[arg-type]


def _run(store: Store, query: LookupQuery, with_details: bool = False):
    before = store.calls
    res = deepest_restorable(query, store.contains, with_details)
    store.last_calls = store.calls - before  # type: ignore[attr-defined]
    return res


# -- the basic cases -------------------------------------------------------------------------
def test_full_hit() -> None:
    hs, s = _hashes(8), Store()
    _fill(s, hs, 8)
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (8, StopReason.FULL)
    assert res.hit_hashes(_q(hs)) == 8
    assert s.last_calls == 1


def test_empty_store_misses_at_first_boundary() -> None:
    hs, s = _hashes(5), Store()
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (0, StopReason.MISSING_ATTENTION)


def test_missing_state_at_deepest_boundary_falls_back() -> None:
    hs, s = _hashes(6), Store()
    _fill(s, hs, 6, states_at=[2, 4, 6])
    s.discard(1, hs[5])  # one of three state groups lost its state at boundary 6
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (4, StopReason.MISSING_STATE)


def test_fallback_skips_boundaries_where_only_some_state_groups_exist() -> None:
    hs, s = _hashes(6), Store()
    _fill(s, hs, 6, states_at=[2])
    for g in (0, 1):  # boundary 5 has 2 of 3 states
        s.add(g, hs[4])
    s.add(2, hs[3])  # boundary 4 has 1 of 3
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (2, StopReason.MISSING_STATE)


def test_missing_attention_block_caps_even_if_later_blocks_and_states_exist() -> None:
    hs, s = _hashes(10), Store()
    _fill(s, hs, 10)
    s.discard(ATTN, hs[3])  # an evicted parent at boundary 4
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (3, StopReason.MISSING_ATTENTION)


def test_missing_attention_at_the_start_gives_nothing_even_with_deep_states() -> None:
    hs, s = _hashes(4), Store()
    _fill(s, hs, 4)
    s.discard(ATTN, hs[0])
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (0, StopReason.MISSING_ATTENTION)


def test_attention_deeper_than_the_hit_is_a_junction() -> None:
    """Another request shared the prefix to boundary 5 but saved its state only at 2."""
    hs, s = _hashes(8), Store()
    _fill(s, hs, 5, states_at=[2])
    res = _run(s, _q(hs))
    assert (res.boundary, res.attention_boundary, res.junction) == (2, 5, 5)
    _fill(s, hs, 5, states_at=[5])
    res = _run(s, _q(hs))
    assert (res.boundary, res.attention_boundary, res.junction) == (5, 5, None)


def test_reason_is_full_when_the_last_boundary_is_restorable_despite_gaps() -> None:
    hs, s = _hashes(5), Store()
    _fill(s, hs, 5, states_at=[1, 5])
    res = _run(s, _q(hs))
    assert (res.boundary, res.reason) == (5, StopReason.FULL)


def test_other_rank_or_namespace_does_not_count() -> None:
    hs, s = _hashes(3), Store()
    other_ns = Namespace("other", "layout-fp").id
    for g in (*STATES, ATTN):
        for h in hs:
            s.add(g, h, rank=1)
            s.add(g, h, ns=other_ns)
    res = _run(s, _q(hs))
    assert res.boundary == 0
    assert _run(s, LookupQuery(NS, 1, hs, 1, GROUPS)).boundary == 3


def test_attention_only_and_state_only_models() -> None:
    hs, s = _hashes(4), Store()
    _fill(s, hs, 3, states_at=[])
    attn_only = [GroupQuery(ATTN, GroupKind.ATTENTION)]
    res = _run(s, _q(hs, groups=attn_only))
    assert (res.boundary, res.reason) == (3, StopReason.MISSING_ATTENTION)
    state_only = [GroupQuery(0, GroupKind.STATE)]
    s.add(0, hs[1])
    res = _run(s, _q(hs, groups=state_only))
    assert (res.boundary, res.reason) == (2, StopReason.MISSING_STATE)


# -- start / max boundaries -------------------------------------------------------------------
def test_start_boundary_blocks_below_are_not_required() -> None:
    hs, s = _hashes(6), Store()
    _fill(s, hs, 6)
    for h in hs[:3]:  # the local prefix is not in the tier at all
        s.discard(ATTN, h)
    res = _run(s, _q(hs, start_boundary=3))
    assert (res.boundary, res.reason) == (6, StopReason.FULL)
    # and it did not even ask for them
    asked = set(s.asked[-1])
    for h in hs[:3]:
        assert BlockKey(NS, 0, ATTN, h).encode() not in asked
    # without the local prefix the same store gives nothing
    assert _run(s, _q(hs)).boundary == 0


def test_start_boundary_result_never_below_start() -> None:
    hs, s = _hashes(6), Store()
    res = _run(s, _q(hs, start_boundary=2))
    assert (res.boundary, res.reason) == (2, StopReason.MISSING_ATTENTION)


def test_start_at_or_past_the_end_is_nothing_to_look_up() -> None:
    hs, s = _hashes(4), Store()
    _fill(s, hs, 4)
    for start in (4, 9):
        res = _run(s, _q(hs, start_boundary=start))
        assert (res.boundary, res.reason) == (start, StopReason.NOTHING_TO_LOOK_UP)
        assert s.last_calls == 0


def test_max_boundary_caps() -> None:
    hs, s = _hashes(8), Store()
    _fill(s, hs, 8)
    res = _run(s, _q(hs, max_boundary=5))
    assert (res.boundary, res.reason) == (5, StopReason.FULL)
    assert len(s.asked[-1]) == 5 * 4  # nothing past the cap was asked
    res = _run(s, _q(hs, max_boundary=100))
    assert res.boundary == 8
    res = _run(s, _q(hs, max_boundary=0))
    assert (res.boundary, res.reason) == (0, StopReason.NOTHING_TO_LOOK_UP)
    res = _run(s, _q(hs, start_boundary=2, max_boundary=2))
    assert (res.boundary, res.reason) == (2, StopReason.NOTHING_TO_LOOK_UP)


def test_max_boundary_with_missing_state_at_cap() -> None:
    hs, s = _hashes(8), Store()
    _fill(s, hs, 8, states_at=[3, 8])
    res = _run(s, _q(hs, max_boundary=6))
    assert (res.boundary, res.reason) == (3, StopReason.MISSING_STATE)


def test_nothing_to_look_up() -> None:
    s = Store()
    assert _run(s, _q([])).reason is StopReason.NOTHING_TO_LOOK_UP
    assert _run(s, _q(_hashes(3), groups=[])).reason is StopReason.NOTHING_TO_LOOK_UP
    # fewer hashes than one boundary
    res = _run(s, _q(_hashes(23), hashes_per_boundary=24))
    assert (res.boundary, res.reason) == (0, StopReason.NOTHING_TO_LOOK_UP)
    assert s.calls == 0


# -- several hashes per block ------------------------------------------------------------------
HPB = 24  # 16-token hashes, 384-token blocks


def test_hashes_per_block_picks_the_last_hash_of_each_block() -> None:
    hs, s = _hashes(5 * HPB + 7), Store()  # a partial boundary at the end is ignored
    groups = [GroupQuery(g, GroupKind.STATE, HPB) for g in STATES] + [
        GroupQuery(ATTN, GroupKind.ATTENTION, HPB)]
    _fill(s, hs, 5, hpb=HPB, groups=groups)
    q = _q(hs, groups=groups, hashes_per_boundary=HPB)
    res = _run(s, q)
    assert (res.boundary, res.reason) == (5, StopReason.FULL)
    assert res.hit_hashes(q) == 5 * HPB
    # exactly the hashes at 24k-1 were asked for: 5 attention blocks + 3 x 5 states
    asked = s.asked[-1]
    assert len(asked) == 20
    wanted = {h.hex() for h in hs[HPB - 1:5 * HPB:HPB]}
    assert {BlockKey.decode(k).block_hash.hex() for k in asked} == wanted
    # a block stored under any other hash of the block does not count
    s.discard(ATTN, hs[3 * HPB - 1])
    s.add(ATTN, hs[3 * HPB - 2])
    res = _run(s, q)
    assert (res.boundary, res.reason) == (2, StopReason.MISSING_ATTENTION)


def test_mixed_block_sizes_fine_attention_coarse_states() -> None:
    # attention in 16-token blocks (24 per boundary), states once per 384-token boundary
    hs, s = _hashes(4 * HPB), Store()
    groups = [GroupQuery(g, GroupKind.STATE, HPB) for g in STATES] + [
        GroupQuery(ATTN, GroupKind.ATTENTION, 1)]
    _fill(s, hs, 4, hpb=HPB, groups=groups)
    q = _q(hs, groups=groups, hashes_per_boundary=HPB)
    assert _run(s, q).boundary == 4
    assert len(s.asked[-1]) == 4 * HPB + 3 * 4
    s.discard(ATTN, hs[2 * HPB + 5])  # one 16-token block inside boundary 3
    res = _run(s, q)
    assert (res.boundary, res.reason) == (2, StopReason.MISSING_ATTENTION)
    assert s.last_calls == 1


def test_two_blocks_per_boundary() -> None:
    # hashes_per_boundary 48 with 24-hash blocks: 2 attention blocks per boundary; the
    # state sits on the second
    hs, s = _hashes(3 * 48), Store()
    groups = [GroupQuery(0, GroupKind.STATE, 24), GroupQuery(ATTN, GroupKind.ATTENTION, 24)]
    _fill(s, hs, 3, hpb=48, groups=groups)
    q = _q(hs, groups=groups, hashes_per_boundary=48)
    assert _run(s, q).boundary == 3
    s.discard(ATTN, hs[48 + 23])  # first block of boundary 2
    assert _run(s, q).boundary == 1


def test_query_helpers_key_and_blocks_at() -> None:
    hs = _hashes(2 * HPB)
    attn = GroupQuery(ATTN, GroupKind.ATTENTION, 1)
    state = GroupQuery(0, GroupKind.STATE, HPB)
    q = _q(hs, groups=[attn, state], hashes_per_boundary=HPB)
    assert q.num_boundaries == 2
    assert list(q.blocks_at(attn, 2)) == list(range(HPB, 2 * HPB))
    assert list(q.blocks_at(state, 2)) == [1]
    assert q.key(state, 1) == BlockKey(NS, 0, 0, hs[2 * HPB - 1])
    assert q.key(attn, 5) == BlockKey(NS, 0, ATTN, hs[5])


# -- details -----------------------------------------------------------------------------------
def test_with_details_rows() -> None:
    hs, s = _hashes(5), Store()
    _fill(s, hs, 5, states_at=[1, 2, 4, 5])
    s.discard(2, hs[1])  # boundary 2: group 2's state missing
    s.discard(ATTN, hs[3])  # boundary 4: attention block missing
    res = _run(s, _q(hs, start_boundary=0), with_details=True)
    assert (res.boundary, res.reason) == (1, StopReason.MISSING_STATE)
    assert s.last_calls == 1
    assert [d.boundary for d in res.details] == [1, 2, 3, 4, 5]
    assert all(isinstance(d, BoundaryDetail) for d in res.details)
    assert [d.num_hashes for d in res.details] == [1, 2, 3, 4, 5]
    assert [d.prefix_ok for d in res.details] == [True, True, True, False, False]
    d2 = res.details[1].present
    assert d2 == {0: True, 1: True, 2: False, ATTN: True}
    assert res.details[2].present == {0: False, 1: False, 2: False, ATTN: True}
    assert res.details[3].present[ATTN] is False
    assert res.details[4].present == {0: True, 1: True, 2: True, ATTN: True}
    # same answer without details, and no rows
    plain = _run(s, _q(hs))
    assert (plain.boundary, plain.reason, plain.details) == (1, StopReason.MISSING_STATE, [])


def test_details_start_after_start_boundary() -> None:
    hs, s = _hashes(24 * 4), Store()
    groups = [GroupQuery(0, GroupKind.STATE, 24), GroupQuery(ATTN, GroupKind.ATTENTION, 24)]
    _fill(s, hs, 4, hpb=24, groups=groups)
    res = _run(s, _q(hs, groups=groups, hashes_per_boundary=24, start_boundary=1),
               with_details=True)
    assert res.boundary == 4
    assert [(d.boundary, d.num_hashes) for d in res.details] == [(2, 48), (3, 72), (4, 96)]


# -- against a brute-force reference ---------------------------------------------------------
def _reference(q: LookupQuery, keys: set[bytes]) -> tuple[int, StopReason]:
    def has(g: GroupQuery, block: int) -> bool:
        return q.key(g, block).encode() in keys

    start, end = q.start_boundary, q.num_boundaries
    if end <= start or not q.groups:
        return start, StopReason.NOTHING_TO_LOOK_UP

    def attn_ok(b: int) -> bool:  # every attention block of boundaries start+1..b
        return all(has(g, i) for g in q.groups if g.kind is GroupKind.ATTENTION
                   for bb in range(start + 1, b + 1) for i in q.blocks_at(g, bb))

    def ok(b: int) -> bool:
        return attn_ok(b) and all(has(g, i) for g in q.groups if g.kind is GroupKind.STATE
                                  for i in q.blocks_at(g, b))

    best = max([b for b in range(start + 1, end + 1) if ok(b)], default=start)
    if best == end:
        return best, StopReason.FULL
    return best, StopReason.MISSING_STATE if attn_ok(best + 1) else StopReason.MISSING_ATTENTION


def _reference_attention(q: LookupQuery, keys: set[bytes]) -> int:
    """Deepest boundary (>= start) with every attention block from start present."""
    start, end = q.start_boundary, q.num_boundaries
    attn = [g for g in q.groups if g.kind is GroupKind.ATTENTION]
    best = start
    for b in range(start + 1, end + 1):
        if not all(q.key(g, i).encode() in keys for g in attn for i in q.blocks_at(g, b)):
            break
        best = b
    return best


@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force_reference(seed: int) -> None:
    rng = random.Random(seed)
    hpbound = rng.choice([1, 2, 4, 24])
    n = rng.randint(0, 8)
    hs = _hashes(n * hpbound + rng.randint(0, hpbound - 1), seed=bytes([seed]))
    groups = [GroupQuery(g, GroupKind.STATE, hpbound) for g in range(rng.randint(0, 3))]
    for g in range(rng.randint(1, 2)):
        groups.append(GroupQuery(10 + g, GroupKind.ATTENTION,
                                 rng.choice([d for d in (1, 2, 4, 24) if hpbound % d == 0])))
    s = Store()
    p_attn = rng.choice([0.8, 0.95, 1.0])
    p_state = rng.choice([0.4, 0.7, 1.0])
    for g in groups:
        p = p_attn if g.kind is GroupKind.ATTENTION else p_state
        for i in range(len(hs) // g.hashes_per_block):
            if rng.random() < p:
                s.add(g.group_id, hs[(i + 1) * g.hashes_per_block - 1])
    start = rng.choice([0, 0, 1, 2])
    mx = rng.choice([None, None, n - 1, n + 3])
    q = _q(hs, groups=groups, hashes_per_boundary=hpbound, start_boundary=start,
           max_boundary=mx)
    want = _reference(q, s.keys)
    want_attn = _reference_attention(q, s.keys)
    for details in (False, True):
        res = _run(s, q, with_details=details)
        assert (res.boundary, res.reason) == want
        assert res.attention_boundary == want_attn
        assert s.last_calls == (0 if want[1] is StopReason.NOTHING_TO_LOOK_UP else 1)
        if details and want[1] is not StopReason.NOTHING_TO_LOOK_UP:
            assert len(res.details) == q.num_boundaries - start


# -- invalid queries ---------------------------------------------------------------------------
@pytest.mark.parametrize("hpb", [5, 7, 48, 0, -24])
def test_hashes_per_block_must_divide(hpb: int) -> None:
    with pytest.raises(ValueError, match=f"hashes_per_block {hpb} must divide "
                                         "hashes_per_boundary 24"):
        LookupQuery(NS, 0, _hashes(48), 24, [GroupQuery(ATTN, GroupKind.ATTENTION, hpb)])


@pytest.mark.parametrize("hpbound", [0, -1])
def test_hashes_per_boundary_must_be_positive(hpbound: int) -> None:
    with pytest.raises(ValueError, match="hashes_per_boundary must be positive"):
        LookupQuery(NS, 0, _hashes(4), hpbound, GROUPS)


def test_negative_start_rejected() -> None:
    with pytest.raises(ValueError, match="start_boundary must be >= 0"):
        LookupQuery(NS, 0, _hashes(4), 1, GROUPS, start_boundary=-1)


def test_group_error_names_the_group() -> None:
    with pytest.raises(ValueError, match="group 7:"):
        LookupQuery(NS, 0, _hashes(4), 4, [GroupQuery(7, GroupKind.STATE, 3)])
