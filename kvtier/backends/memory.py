"""The embedded in-process CPU store: a byte-bounded dict with prefix-aware eviction."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kvtier.backends.base import Backend, BackendStats, EntryInfo, PutItem
from kvtier.backends.eviction import EntryMeta, EvictionPolicy, make_policy
from kvtier.payload import REFUSE, REPLACE, put_verdict


@dataclass(slots=True)
class _Entry:
    value: bytes
    parent: bytes | None
    children: int = 0
    pinned: bool = False
    # Identity of this entry and of the parent entry it was linked to: if the
    # parent key is deleted and stored again, the new entry is not our parent.
    serial: int = 0
    parent_serial: int = -1
    # Where the bytes live in an arena store (see arena_store.py), and how many
    # one-sided readers hold a lease on them (a leased entry is never evicted).
    ext: object = None
    leases: int = 0


class MemoryBackend(Backend):
    """Thread-safe; never holds more than ``capacity_bytes`` of payload."""

    name = "memory"

    def __init__(self, capacity_bytes: int = 1 << 30, policy: str | EvictionPolicy = "lru"):
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self.capacity_bytes = capacity_bytes
        self._policy = make_policy(policy) if isinstance(policy, str) else policy
        self._entries: dict[bytes, _Entry] = {}
        self._used = 0
        self._serials = itertools.count()
        self._lock = threading.Lock()
        self._hits = self._misses = self._puts = self._evictions = self._rejected = 0
        self._replaced = 0
        self._pending: set[bytes] = set()  # see _batch

    # -- reads -------------------------------------------------------------
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None:
                    self._misses += 1
                    out.append(None)
                else:
                    self._hits += 1
                    self._policy.touched(k)
                    out.append(self._read(e))
        return out

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        entries = self._entries
        return [k in entries for k in keys]

    def scan(self, prefix: bytes = b"", limit: int | None = None) -> Iterator[EntryInfo]:
        with self._lock:
            snap = [
                EntryInfo(k, len(e.value), e.pinned, e.children)
                for k, e in self._entries.items()
                if k.startswith(prefix)
            ]
        snap.sort(key=lambda e: e.key)
        yield from snap[:limit] if limit is not None else snap

    # -- writes ------------------------------------------------------------
    def put_many(self, items: Sequence[PutItem]) -> int:
        with self._lock, self._batch(it.parent for it in items):
            return sum(self._put(it) for it in items)

    @contextmanager
    def _batch(self, parents: Iterable[bytes | None]) -> Iterator[None]:
        """While one put stores its items (lock held), a key that one of them names as
        ``parents`` is not evicted: a state is saved after the attention block it sits on,
        which is a leaf until then, and a value-aware policy would evict that cheap leaf
        first, leaving the state without its prefix. Afterwards they are leaves again."""
        pending = {p for p in parents if p is not None}
        self._pending = pending
        try:
            yield
        finally:
            self._pending = set()
            for k in pending:  # a victim search may have dropped them as non-leaves
                if self._is_leaf(k):
                    self._policy.leaf(k)

    def _put(self, it: PutItem, at: object = None) -> int:
        """Store one item (lock held): 1 if the store holds it now, else 0. Every rule of
        a put lives here (size, verdict, parent link, room, policy, counters); ``at`` is
        where an arena store's value already lies, adopted instead of copied (see
        :meth:`_place`)."""
        size = len(it.value)
        if size > self.capacity_bytes:
            self._rejected += 1
            return 0
        old = self._entries.get(it.key)
        if old is not None:
            verdict = put_verdict(it.key, old.value, it.value)
            if verdict == REPLACE:
                return self._replace(it, old, at)
            if verdict == REFUSE:
                self._rejected += 1
                return 0
            self._policy.touched(it.key)  # same key, same meaning: keep it, just refresh it
            return 1
        # Link to the parent first so making room can never evict it.
        parent = it.parent if it.parent in self._entries else None
        parent_serial = -1
        if parent is not None:
            p = self._entries[parent]
            p.children += 1
            parent_serial = p.serial
        placed = self._place(it.value, size, at=at)
        if placed is None:
            if parent is not None:
                self._unlink(parent, parent_serial)
            self._rejected += 1
            return 0
        self._entries[it.key] = _Entry(placed[0], parent, serial=next(self._serials),
                                       parent_serial=parent_serial, ext=placed[1])
        self._used += size
        self._policy.added(it.key, EntryMeta(size, it.parent))
        self._policy.touched(it.key)
        self._puts += 1
        return 1

    def _replace(self, it: PutItem, e: _Entry, at: object = None) -> int:
        """Put new bytes into an existing entry (lock held); 1 if done, 0 if no room.

        The entry keeps its identity (serial), children and pin, so links to it
        stay valid and it is still not evictable while children exist; only its
        own parent link follows the new item.
        """
        parent = it.parent if it.parent in self._entries and it.parent != it.key else None
        parent_serial = -1
        if parent is not None:  # link first: making room can never evict it
            p = self._entries[parent]
            p.children += 1
            parent_serial = p.serial
        grow = len(it.value) - len(e.value)
        placed = self._place(it.value, grow, keep=it.key, at=at)
        if placed is None:
            if parent is not None:
                self._unlink(parent, parent_serial)
            if e.children == 0 and not e.pinned:
                self._policy.leaf(it.key)  # the victim search may have dropped it
            self._rejected += 1
            return 0
        if e.parent is not None:
            self._unlink(e.parent, e.parent_serial)
        self._drop_value(e)
        (e.value, e.ext), e.parent, e.parent_serial = placed, parent, parent_serial
        self._used += grow
        self._policy.added(it.key, EntryMeta(len(it.value), it.parent))
        self._policy.touched(it.key)
        self._puts += 1
        self._replaced += 1
        return 1

    def delete_many(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            return sum(self._remove(k) for k in keys)

    def pin(self, keys: Sequence[bytes], pinned: bool = True) -> int:
        n = 0
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is not None:
                    e.pinned = pinned
                    n += 1
                    if not pinned and e.children == 0:
                        self._policy.leaf(k)
        return n

    def export(self) -> list[tuple[PutItem, bool]]:
        """Every entry as (item with its live parent link, pinned), oldest first, without
        touching recency or hit counts: what a snapshot writes (see backends/snapshot.py)."""
        with self._lock:
            out = []
            for k, e in self._entries.items():
                p = self._entries.get(e.parent) if e.parent is not None else None
                parent = e.parent if p is not None and p.serial == e.parent_serial else None
                # _read: an arena store's bytes may be reused once the lock is let go.
                out.append((PutItem(k, self._read(e), parent), e.pinned))
            return out

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(
                backend=self.name,
                entries=len(self._entries),
                bytes_used=self._used,
                capacity_bytes=self.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                puts=self._puts,
                evictions=self._evictions,
                pinned=sum(1 for e in self._entries.values() if e.pinned),
                extra={"rejected": self._rejected, "replaced": self._replaced,
                       "policy": self._policy.name},
            )

    # -- internals (lock held) --------------------------------------------
    def _is_leaf(self, key: bytes) -> bool:
        e = self._entries.get(key)
        return (e is not None and e.children == 0 and not e.pinned and not e.leases
                and key not in self._pending)

    def _read(self, e: _Entry) -> bytes:
        return e.value

    def _place(self, value: bytes, grow: int, keep: bytes | None = None,
               at: object = None) -> tuple[bytes, object] | None:
        """Room for ``grow`` more bytes, then (stored value, extent); None if full.
        ``at`` (arena store only) is an extent already holding ``value``."""
        return (value, None) if grow <= 0 or self._make_room(grow, keep) else None

    def _drop_value(self, e: _Entry) -> None:
        """``e``'s bytes are no longer the entry's (removed or replaced)."""

    def _make_room(self, size: int, keep: bytes | None = None) -> bool:
        is_leaf = self._is_leaf if keep is None else (lambda k: k != keep and self._is_leaf(k))
        while self._used + size > self.capacity_bytes:
            victim = self._policy.victim(is_leaf)
            if victim is None:
                return False
            self._remove(victim)
            self._evictions += 1
        return True

    def _remove(self, key: bytes) -> bool:
        e = self._entries.pop(key, None)
        if e is None:
            return False
        self._used -= len(e.value)
        self._drop_value(e)
        self._policy.forget(key)
        if e.parent is not None:
            self._unlink(e.parent, e.parent_serial)
        # Orphaned children stay (lookup verifies prefixes); they are leaves or parents as before.
        return True

    def _unlink(self, parent: bytes, serial: int) -> None:
        p = self._entries.get(parent)
        if p is not None and p.serial == serial:
            p.children -= 1
            if p.children == 0 and not p.pinned:
                self._policy.leaf(parent)
