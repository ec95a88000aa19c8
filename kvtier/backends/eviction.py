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


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LeafLRU, LeafFIFO)}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}"
        ) from None
