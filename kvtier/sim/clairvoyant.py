"""Clairvoyant eviction for the simulator: Belady's rule with the trace's future.

Not a store plug-in (no store knows the future): a reference that shows how far
an online eviction is from one that knows which request needs which prefix
next, at the same capacity and with the same admission. The victim is the leaf
whose prefix is next needed furthest in the future (never again first, larger
first among those). Belady is optimal for equal sizes without dependencies;
here sizes differ and parents outlive children, so it is a strong reference,
not a proven optimum.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Sequence

from kvtier.backends.eviction import EntryMeta, EvictionPolicy
from kvtier.keys import BlockKey

NEVER = 1 << 62


class Clairvoyant(EvictionPolicy):
    name = "clairvoyant"

    def __init__(self, hashes: Sequence[Sequence[bytes]]) -> None:
        """``hashes[i]``: the restorable prefix hashes of request ``i``, in trace order."""
        self._requests = [tuple(hs) for hs in hashes]
        self._uses: dict[bytes, list[int]] = {}  # block hash -> requests that can restore it
        for i, hs in enumerate(self._requests):
            for h in hs:
                self._uses.setdefault(h, []).append(i)
        self._now = 0
        self._hash: dict[bytes, bytes] = {}
        self._size: dict[bytes, int] = {}
        self._version: dict[bytes, int] = {}
        self._by_hash: dict[bytes, set[bytes]] = {}
        self._heap: list[tuple[int, int, int, int, bytes]] = []
        self._seq = itertools.count()

    def advance(self, request: int) -> None:
        """Request ``request`` starts: the prefixes the previous one passed get their next
        use moved on (the only entries whose rank changes), so the heap stays exact."""
        self._now = request
        for h in self._requests[request - 1] if request else ():
            for key in self._by_hash.get(h, ()):
                self._push(key)

    def next_use(self, key: bytes) -> int:
        uses = self._uses.get(self._hash[key], ())
        i = bisect.bisect_left(uses, self._now)
        return uses[i] if i < len(uses) else NEVER

    def added(self, key: bytes, meta: EntryMeta) -> None:
        h = BlockKey.decode(key).block_hash
        self._hash[key], self._size[key] = h, meta.size
        self._by_hash.setdefault(h, set()).add(key)

    def touched(self, key: bytes) -> None:
        self._push(key)

    def leaf(self, key: bytes) -> None:
        self._push(key)

    def forget(self, key: bytes) -> None:
        h = self._hash.pop(key, None)
        self._size.pop(key, None)
        self._version.pop(key, None)
        if h is not None:
            self._by_hash.get(h, set()).discard(key)

    def victim(self, is_leaf) -> bytes | None:  # noqa: ANN001
        while self._heap:
            _, _, _, version, key = heapq.heappop(self._heap)
            if self._version.get(key) != version or not is_leaf(key):
                continue
            return key
        return None

    def _push(self, key: bytes) -> None:
        if key not in self._hash:
            return
        v = self._version.get(key, 0) + 1
        self._version[key] = v
        heapq.heappush(self._heap, (-self.next_use(key), -self._size[key], next(self._seq), v,
                                    key))
