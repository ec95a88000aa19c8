"""Eviction by value: deep, hot and chain-end states outlive what LRU would keep instead."""

from __future__ import annotations

import pytest

from kvtier.backends.base import PutItem
from kvtier.backends.eviction import LeafValue, make_policy
from kvtier.backends.memory import MemoryBackend
from kvtier.keys import BlockKey

MIB = 1 << 20
NS = bytes(16)
ATTN, STATE = 0, 1


def key(group: int, name: str) -> bytes:
    return BlockKey(NS, 0, group, name.encode()).encode()


def chain(name: str, depth: int, states: tuple[int, ...]) -> list[PutItem]:
    """Attention blocks 1..depth (1 MiB each) and 3 MiB states at the given boundaries."""
    items, parent = [], None
    for b in range(1, depth + 1):
        a = key(ATTN, f"{name}{b}")
        items.append(PutItem(a, b"a" * MIB, parent))
        if b in states:
            items.append(PutItem(key(STATE, f"{name}{b}"), b"s" * (3 * MIB), a))
        parent = a
    return items


def survivors(policy: str, capacity_mib: int, *steps) -> set[str]:  # noqa: ANN002
    store = MemoryBackend(capacity_mib * MIB, policy=policy)
    for step in steps:
        step(store)
    return {BlockKey.decode(e.key).block_hash.decode() + ("s" if BlockKey.decode(e.key).group
                                                          else "") for e in store.scan()}


def put(items: list[PutItem]):  # noqa: ANN201
    return lambda store: store.put_many(items)


def read(*keys: bytes):  # noqa: ANN201
    return lambda store: store.get_many(list(keys))


@pytest.mark.parametrize("policy", ["lru", "value"])
def test_deep_state_outlives_a_newer_shallow_one(policy: str) -> None:
    kept = survivors(policy, 14, put(chain("A", 4, (4,))), put(chain("B", 1, (1,))),
                     put(chain("C", 1, (1,))))
    assert "C1s" in kept
    if policy == "lru":
        assert "A4s" not in kept and "B1s" in kept  # LRU drops the oldest: the deep one
    else:
        assert "A4s" in kept and "B1s" not in kept


@pytest.mark.parametrize("policy", ["lru", "value"])
def test_hot_state_outlives_newer_cold_ones(policy: str) -> None:
    hot = key(STATE, "X1")
    kept = survivors(policy, 12, put(chain("X", 1, (1,))), read(hot), read(hot), read(hot),
                     put(chain("Y", 1, (1,))), put(chain("Z", 1, (1,))),
                     put(chain("W", 1, (1,))))
    assert ("X1s" in kept) == (policy == "value")
    assert "W1s" in kept


@pytest.mark.parametrize("policy", ["lru", "value"])
def test_mid_chain_state_goes_before_a_chain_end_state(policy: str) -> None:
    kept = survivors(policy, 14, put(chain("E", 2, (2,))), put(chain("M", 4, (2, 4))),
                     put(chain("N", 1, ())))
    if policy == "lru":
        assert "E2s" not in kept and "M2s" in kept
    else:
        assert "E2s" in kept and "M2s" not in kept and "M4s" in kept


def test_parents_outlive_children_under_value() -> None:
    """Leaf-only: whatever is evicted, every stored state still has its whole prefix."""
    store = MemoryBackend(40 * MIB, policy="value")
    for i in range(12):
        store.put_many(chain(f"P{i}x", 1 + i % 5, tuple(range(1, 6))))
        store.get_many([key(STATE, "P0x1")])
    names = {BlockKey.decode(e.key).block_hash.decode() for e in store.scan()
             if BlockKey.decode(e.key).group == ATTN}
    for e in store.scan():
        k = BlockKey.decode(e.key)
        stem, depth = k.block_hash.decode()[:-1], int(k.block_hash.decode()[-1])
        assert all(f"{stem}{b}" in names for b in range(1, depth + 1)), k
    assert store.stats().evictions > 0


def test_kind_and_depth_from_parents() -> None:
    p = make_policy("value")
    assert isinstance(p, LeafValue)
    from kvtier.backends.eviction import EntryMeta

    a1, a2, s2 = key(ATTN, "q1"), key(ATTN, "q2"), key(STATE, "q2")
    for k, parent in ((a1, None), (a2, a1), (s2, a2)):
        p.added(k, EntryMeta(MIB, parent))
        p.touched(k)
    assert (p._meta[s2].state, p._meta[s2].depth, p._meta[a2].depth) == (True, 2, 2)
    assert not p._meta[a2].state


@pytest.mark.parametrize("policy", ["lru", "value"])
def test_branch_point_state_outlives_a_mid_chain_one(policy: str) -> None:
    """A state where two prefixes part (a junction) is a hit point; one with a single
    continuation is served by the deeper state of that continuation."""
    fork = [PutItem(key(g, n), b"x" * (3 * MIB if g else MIB), key(ATTN, "J2" if not g else n))
            for n in ("J3", "K3") for g in (ATTN, STATE)]
    kept = survivors(policy, 23, put(chain("J", 2, (2,)) + fork), put(chain("M", 4, (2, 4))),
                     put(chain("N", 1, ())))
    if policy == "lru":
        assert "J2s" not in kept and "M2s" in kept
    else:
        assert "J2s" in kept and "M2s" not in kept and "M4s" in kept


@pytest.mark.parametrize("prior", [0.0, 0.25])
def test_fresh_state_on_a_busy_prefix_outlives_a_one_off(prior: float) -> None:
    """A state just saved where many requests passed (its attention block was read by
    each) is predicted to be hit; a one-off request's state of the same size is not."""
    store = MemoryBackend(12 * MIB, policy=LeafValue(prefix_prior=prior))
    store.put_many(chain("J", 2, (2,)))
    for _ in range(4):
        store.get_many([key(ATTN, "J1"), key(ATTN, "J2")])
    store.put_many(chain("U", 2, (2,)))
    store.put_many(chain("V", 1, (1,)))
    kept = {(BlockKey.decode(e.key).block_hash.decode(), BlockKey.decode(e.key).group)
            for e in store.scan()}
    assert ("V1", STATE) in kept
    if prior:
        assert ("J2", STATE) in kept and ("U2", STATE) not in kept
    else:  # equal value without the prior: the older one goes
        assert ("J2", STATE) not in kept and ("U2", STATE) in kept


def test_a_state_saved_after_its_block_in_one_put_keeps_its_prefix() -> None:
    """A chain's last block is a cheap leaf until its state arrives later in the same put;
    making room for an earlier state of that put must not evict it (under value eviction
    it did, and the last state was stored without its prefix)."""
    store = MemoryBackend(8 * MIB, policy="value")
    store.put_many(chain("X", 1, (1,)))
    store.put_many(chain("Y", 2, ()) + [
        PutItem(key(STATE, f"Y{b}"), b"s" * (3 * MIB), key(ATTN, f"Y{b}")) for b in (1, 2)])
    kept = {BlockKey.decode(e.key).block_hash.decode() + ("s" if BlockKey.decode(e.key).group
                                                          else "") for e in store.scan()}
    assert kept == {"Y1", "Y2", "Y1s", "Y2s"}


def test_a_block_kept_for_a_state_that_never_came_is_evictable_again() -> None:
    """The victim search passes over the protected block during the put; when the put
    ends without its state (refused: too big), the block must be a leaf to the policy
    again, and the cheapest one, rather than stay for ever."""
    store = MemoryBackend(8 * MIB, policy="value")
    store.put_many(chain("X", 1, (1,)))
    store.put_many(chain("Y", 2, ()) + [
        PutItem(key(STATE, "Y1"), b"s" * (3 * MIB), key(ATTN, "Y1")),
        PutItem(key(STATE, "Y2"), b"s" * (9 * MIB), key(ATTN, "Y2"))])  # > capacity
    store.put_many(chain("Z", 1, (1,)))
    kept = {BlockKey.decode(e.key).block_hash.decode() + ("s" if BlockKey.decode(e.key).group
                                                          else "") for e in store.scan()}
    assert kept == {"Y1", "Y1s", "Z1", "Z1s"}
