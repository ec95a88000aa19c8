"""The memory store with its payloads in an :class:`~kvtier.backends.arena.Arena`, for
one-sided readers and writers (NIXL).

A reader first *locates* keys: it gets each payload's extent (region, offset,
length, generation) under a *lease*. While leased, an entry is not
evicted, and a delete or replacement of it leaves the leased bytes in place
(the new value is written elsewhere) until the lease is released or expires.
A writer *reserves* extents, writes them, then *commits* them: the entries adopt them;
uncommitted reservations expire. Same leaf-only eviction as the plain store.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvtier.backends.arena import DEFAULT_REGION_BYTES, GEN_BYTES, Arena, Extent
from kvtier.backends.base import BackendStats, PutItem
from kvtier.backends.eviction import EvictionPolicy
from kvtier.backends.memory import MemoryBackend, _Entry

MAX_LEASE_S = 60.0


@dataclass(frozen=True, slots=True)
class Located:
    """Where one payload is, as a reader needs it (address = region base + offset)."""

    region: int
    offset: int
    length: int  # generation word + payload (the extent itself may be padded)
    generation: int


def checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


class ArenaMemoryBackend(MemoryBackend):
    name = "memory"

    def __init__(self, capacity_bytes: int = 1 << 30, policy: str | EvictionPolicy = "lru",
                 region_bytes: int = DEFAULT_REGION_BYTES):
        super().__init__(capacity_bytes, policy)
        # ``capacity_bytes`` still bounds the payload held; the slack absorbs generation
        # words, alignment and fragmentation (address space only until touched).
        self.arena = Arena(capacity_bytes + capacity_bytes // 4 + (1 << 20), region_bytes)
        self._ids = itertools.count(1)
        # lease id -> (expiry, [(key, entry serial, extent)])
        self._leases: dict[int, tuple[float, list[tuple[bytes, int, Extent]]]] = {}
        # reservation id -> (expiry, [extent | None])
        self._reserved: dict[int, tuple[float, list[Extent | None]]] = {}
        self.leases_expired = 0

    # -- hooks of MemoryBackend (lock held) ---------------------------------
    def _read(self, e: _Entry) -> bytes:
        return bytes(e.value)  # the extent may be reused once the lock is let go

    def _place(self, value: bytes, grow: int, keep: bytes | None = None,  # noqa: ANN201
               at: object = None):
        if grow > 0 and not self._make_room(grow, keep):
            return None
        if at is not None:  # a committed extent: its bytes become the entry's, no copy
            at.refs += 1  # type: ignore[attr-defined]
            return value, at
        ext = self._alloc(len(value), keep)
        if ext is None:
            return None
        return self.arena.write(ext, value), ext

    def _make_room(self, size: int, keep: bytes | None = None) -> bool:
        if self._used + size > self.capacity_bytes and (self._leases or self._reserved):
            self._sweep(time.monotonic())  # expired leases first: their entries are leaves again
        return super()._make_room(size, keep)

    def _drop_value(self, e: _Entry) -> None:
        if e.ext is not None:
            self._unref(e.ext)  # type: ignore[arg-type]
            e.ext = None

    # -- allocation -----------------------------------------------------------
    def _alloc(self, nbytes: int, keep: bytes | None = None) -> Extent | None:
        """An extent, evicting leaves while the arena is too full or fragmented."""
        swept = False
        while True:
            ext = self.arena.alloc(nbytes)
            if ext is not None:
                return ext
            victim = self._policy.victim(
                self._is_leaf if keep is None else (lambda k: k != keep and self._is_leaf(k)))
            if victim is not None:
                self._remove(victim)
                self._evictions += 1
                continue
            if swept or not self._sweep(time.monotonic()):
                return None
            swept = True

    def _unref(self, ext: Extent) -> None:
        ext.refs -= 1
        if ext.refs == 0:
            self.arena.free(ext)

    def _sweep(self, now: float) -> bool:
        """End expired leases and reservations; True if any ended."""
        ended = False
        for lid in [i for i, (exp, _) in self._leases.items() if exp <= now]:
            self._end_lease(lid)
            self.leases_expired += 1
            ended = True
        for rid in [i for i, (exp, _) in self._reserved.items() if exp <= now]:
            for ext in self._reserved.pop(rid)[1]:
                if ext is not None:
                    self._unref(ext)
            ended = True
        return ended

    def _end_lease(self, lease_id: int) -> bool:
        got = self._leases.pop(lease_id, None)
        if got is None:
            return False
        for key, serial, ext in got[1]:
            e = self._entries.get(key)
            if e is not None and e.serial == serial:
                e.leases -= 1
                if self._is_leaf(key):
                    self._policy.leaf(key)
            self._unref(ext)
        return True

    # -- one-sided reads --------------------------------------------------------
    def locate(self, keys: Sequence[bytes], lease_s: float) -> tuple[int, list[Located | None]]:
        """Extents of ``keys`` (None where missing) under one lease (id 0: nothing found)."""
        lease_s = min(max(lease_s, 0.001), MAX_LEASE_S)
        now = time.monotonic()
        out: list[Located | None] = []
        held: list[tuple[bytes, int, Extent]] = []
        with self._lock:
            self._sweep(now)
            for k in keys:
                e = self._entries.get(k)
                ext: Extent | None = e.ext if e is not None else None  # type: ignore[assignment]
                if ext is None:
                    self._misses += 1
                    out.append(None)
                    continue
                self._hits += 1
                self._policy.touched(k)
                e.leases += 1  # type: ignore[union-attr]
                ext.refs += 1
                held.append((k, e.serial, ext))  # type: ignore[union-attr]
                out.append(Located(ext.region, ext.offset, GEN_BYTES + ext.payload_len,
                                   ext.generation))
            lease_id = 0
            if held:
                lease_id = next(self._ids)
                self._leases[lease_id] = (now + lease_s, held)
        return lease_id, out

    def release(self, lease_id: int) -> bool:
        with self._lock:
            return self._end_lease(lease_id)

    # -- one-sided writes -------------------------------------------------------
    def reserve(self, sizes: Sequence[int], ttl_s: float) -> tuple[int, list[Located | None]]:
        """Extents for payloads of ``sizes`` (None where there is no room), to be written
        by the caller and then :meth:`commit`-ted before ``ttl_s`` runs out."""
        ttl_s = min(max(ttl_s, 0.001), MAX_LEASE_S)
        now = time.monotonic()
        exts: list[Extent | None] = []
        with self._lock:
            self._sweep(now)
            for n in sizes:
                ext = self._alloc(n) if 0 <= n <= self.capacity_bytes else None
                exts.append(ext)
            rid = next(self._ids)
            self._reserved[rid] = (now + ttl_s, exts)
        return rid, [None if x is None else Located(x.region, x.offset, GEN_BYTES + x.payload_len,
                                                    x.generation) for x in exts]

    def commit(self, reservation: int,
               items: Sequence[tuple[int, bytes, bytes | None, int]]) -> tuple[int, int]:
        """Store written extents ``(index, key, parent, checksum)`` of a reservation as
        entries, parents first; a payload whose checksum differs from the given one is refused.
        Returns how many were stored and the bytes that arrived sound; the rest of the
        reservation is freed.

        The entries adopt the written extents (no copy of what NIXL wrote) through the
        ordinary put step, so verdicts, parent links, room and policy are the same as
        :meth:`put_many`'s; ``capacity_bytes`` bounds them as any put, and an extent
        that is not adopted (refused, kept, no room) goes back with the reservation."""
        stored = nbytes = 0
        with self._lock, self._batch(parent for _, _, parent, _ in items):
            got = self._reserved.pop(reservation, None)
            if got is None:
                return 0, 0
            exts = got[1]
            seen: set[int] = set()
            for i, key, parent, digest in items:
                ext = exts[i] if 0 <= i < len(exts) and i not in seen else None
                view = self.arena.payload(ext) if ext is not None else b""
                if ext is None or checksum(view) != digest:
                    self._rejected += 1
                    continue
                seen.add(i)  # one extent, one entry
                nbytes += len(view)
                stored += self._put(PutItem(key, view, parent), at=ext)  # type: ignore[arg-type]
            for ext in exts:  # the reservation's hold; adopted ones stay with their entry
                if ext is not None:
                    self._unref(ext)
        return stored, nbytes

    def outstanding(self) -> bool:
        """Leases or reservations exist: one-sided transfers may be under way."""
        return bool(self._leases or self._reserved)

    def stats(self) -> BackendStats:
        s = super().stats()
        with self._lock:
            s.extra.update(arena_bytes=self.arena.capacity, arena_allocated=self.arena.allocated,
                           leases=len(self._leases), leases_expired=self.leases_expired,
                           reservations=len(self._reserved))
        return s

    def close(self) -> None:
        self.arena.close()
