"""Eviction policies for bounded in-process stores, as small plug-ins.

Only *leaves* may be evicted: an entry with stored children (later blocks of
the same prefix, or a recurrent state sitting on an attention block) stays
until they are gone, because a state at boundary k is worthless without the
blocks before it. Among leaves the policy picks the victim.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvtier.keys import is_state_link


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """What the store knows of an entry it just stored (for value-aware policies)."""

    size: int
    parent: bytes | None  # the key the writer says this one extends (stored or not)


class EvictionPolicy(ABC):
    """Tracks evictable leaves; the store tells it when keys become/stop being leaves."""

    name = "abstract"

    def added(self, key: bytes, meta: EntryMeta) -> None:  # noqa: B027 - optional hook
        """``key`` was stored (or its value replaced), before its ``touched``."""

    @abstractmethod
    def leaf(self, key: bytes) -> None:
        """``key`` is (again) an evictable leaf."""

    @abstractmethod
    def touched(self, key: bytes) -> None:
        """``key`` was read or written."""

    @abstractmethod
    def victim(self, is_leaf) -> bytes | None:  # noqa: ANN001 - Callable[[bytes], bool]
        """Next key to evict, or None; ``is_leaf`` re-checks eligibility."""

    @abstractmethod
    def forget(self, key: bytes) -> None: ...


class LeafLRU(EvictionPolicy):
    """Least recently used leaf first (lazy-invalidated heap of access ticks)."""

    name = "lru"

    def __init__(self) -> None:
        self._tick = itertools.count()
        self._last: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def touched(self, key: bytes) -> None:
        t = next(self._tick)
        self._last[key] = t
        heapq.heappush(self._heap, (t, key))
        self._compact()

    def leaf(self, key: bytes) -> None:
        t = self._last.get(key)
        if t is None:
            self.touched(key)
        else:
            heapq.heappush(self._heap, (t, key))

    def forget(self, key: bytes) -> None:
        self._last.pop(key, None)

    def victim(self, is_leaf) -> bytes | None:  # noqa: ANN001
        while self._heap:
            t, key = heapq.heappop(self._heap)
            if self._last.get(key) == t and is_leaf(key):
                return key
        return None

    def _compact(self) -> None:
        if len(self._heap) > 4 * len(self._last) + 1024:
            self._heap = [(t, k) for k, t in self._last.items()]
            heapq.heapify(self._heap)


class LeafFIFO(LeafLRU):
    """Oldest-inserted leaf first: reads do not refresh an entry."""

    name = "fifo"

    def touched(self, key: bytes) -> None:
        if key not in self._last:
            super().touched(key)


@dataclass(slots=True)
class _Value:
    size: int
    parent: bytes | None
    state: bool
    depth: int  # boundaries of prefix this entry restores (a state: its boundary)
    hits: int = 0
    base: float = 0.0  # the inflation L when it was last touched (GDSF aging)
    version: int = 0


class LeafValue(EvictionPolicy):
    """Evict the leaf with the least expected recompute saved per byte (GreedyDual-Size-
    Frequency): priority = L + depth^e x (1 + hits) x kind / MiB, where L is the priority
    of the last victim, so untouched entries age behind fresh ones (recency). Depth is
    the prefix in boundaries; e = 0.5 because deep chains (long sessions) save more per
    hit but are reused less often (e = 1 kept ended long sessions too long in
    ``kvtier bench admission``; 0.5 was best there on two trace seeds).

    Kind: a recurrent state is what a hit lands on. One that sits mid-chain (its
    prefix continues in the store along exactly one path, so a deeper state of
    that path serves its requests) is worth ``mid_chain`` of one at a chain's end
    or at a branch point (several continuations: where requests part). An
    attention leaf (a chain's tail without a state) is worth ``attention``: it
    restores nothing by itself, it only marks a shared prefix (a junction).
    A state is told apart by its writer-declared parent being in another group
    (states hang off the attention block at their boundary; attention blocks off
    the previous block of their own group).

    A state's hits are at least ``prefix_prior`` x its attention block's: requests
    that passed its prefix predict those that will land on it, so a state just
    saved at a busy junction is not evicted as a one-off before its first hit
    (0.25: chosen on trace seeds 0-3 of ``kvtier bench admission``, checked on 4-6).
    """

    name = "value"

    def __init__(self, mid_chain: float = 0.25, attention: float = 0.02,
                 depth_exponent: float = 0.5, prefix_prior: float = 0.25) -> None:
        self.mid_chain, self.attention = mid_chain, attention
        self.depth_exponent = depth_exponent
        self.prefix_prior = prefix_prior
        self._meta: dict[bytes, _Value] = {}
        self._chain_children: dict[bytes, int] = {}  # attention key -> attention children
        self._states_on: dict[bytes, set[bytes]] = {}  # attention key -> states on it
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._seq = itertools.count()
        self._inflation = 0.0

    def added(self, key: bytes, meta: EntryMeta) -> None:
        self._drop(key)
        p = self._meta.get(meta.parent) if meta.parent is not None else None
        state = is_state_link(key, meta.parent)
        depth = (p.depth if p else 1) if state else (p.depth + 1 if p else 1)
        self._meta[key] = _Value(meta.size, meta.parent, state, depth, hits=-1)
        if meta.parent is None:
            return
        if state:
            self._states_on.setdefault(meta.parent, set()).add(key)
            return
        self._chain_children[meta.parent] = self._chain_children.get(meta.parent, 0) + 1
        for s in self._states_on.get(meta.parent, ()):  # its kind changed: re-queue
            if s in self._meta:
                self._push(s, self._meta[s])

    def touched(self, key: bytes) -> None:
        m = self._meta.get(key)
        if m is None:  # a store that does not call added(): a leaf of unknown shape
            m = self._meta[key] = _Value(1, None, False, 1, hits=-1)
        m.hits += 1
        m.base = self._inflation
        self._push(key, m)

    def leaf(self, key: bytes) -> None:
        m = self._meta.get(key)
        if m is None:
            self.touched(key)
        else:
            self._push(key, m)

    def forget(self, key: bytes) -> None:
        self._drop(key)
        self._states_on.pop(key, None)

    def priority(self, key: bytes) -> float:
        m = self._meta[key]
        hits = float(max(m.hits, 0))
        if m.state:
            # one continuation: a deeper state of the same chain serves its requests;
            # none (the chain's end) or several (a branch point): a hit lands here
            mid = self._chain_children.get(m.parent, 0) == 1  # type: ignore[arg-type]
            kind = self.mid_chain if mid else 1.0
            prefix = self._meta.get(m.parent)  # type: ignore[arg-type]
            if prefix is not None:
                hits = max(hits, self.prefix_prior * max(prefix.hits, 0))
        else:
            kind = self.attention
        depth = m.depth ** self.depth_exponent
        return m.base + depth * (1 + hits) * kind / max(m.size / (1 << 20), 1e-6)

    def victim(self, is_leaf) -> bytes | None:  # noqa: ANN001
        while self._heap:
            prio, _, version, key = heapq.heappop(self._heap)
            m = self._meta.get(key)
            if m is None or m.version != version or not is_leaf(key):
                continue
            now = self.priority(key)
            if now > prio + 1e-12:  # grew since pushed (e.g. its chain was cut): re-queue
                self._push(key, m)
                continue
            self._inflation = max(self._inflation, now)
            return key
        return None

    def _push(self, key: bytes, m: _Value) -> None:
        m.version += 1
        heapq.heappush(self._heap, (self.priority(key), next(self._seq), m.version, key))
        if len(self._heap) > 4 * len(self._meta) + 1024:
            self._heap = [(self.priority(k), next(self._seq), v.version, k)
                          for k, v in self._meta.items()]
            heapq.heapify(self._heap)

    def _drop(self, key: bytes) -> None:
        m = self._meta.pop(key, None)
        if m is not None and m.state and m.parent in self._states_on:
            self._states_on[m.parent].discard(key)
        elif m is not None and not m.state and m.parent is not None:
            n = self._chain_children.get(m.parent, 0) - 1
            if n > 0:
                self._chain_children[m.parent] = n
            else:
                self._chain_children.pop(m.parent, None)


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (LeafLRU, LeafFIFO, LeafValue)
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}"
        ) from None
