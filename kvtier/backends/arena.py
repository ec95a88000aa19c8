"""Payload bytes in a few large preallocated regions, so a NIXL agent registers them once.

Registering memory with NIXL/UCX per object is slow and its metadata grows with
every registration; a store whose payloads live in a handful of regions
registers those once at start-up and hands readers (region, offset, length)
descriptors instead. Regions are anonymous mappings: untouched capacity costs
no RAM.

Each extent starts with an 8-byte generation word (a fresh number per
allocation, zeroed on free), then the payload. A one-sided reader that was told
generation ``g`` and finds another word read an extent that was freed or reused
under it: a miss, never a wrong payload.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import struct
from dataclasses import dataclass, field

import numpy as np

ALIGN = 64
GEN_BYTES = 8
_GEN = struct.Struct("<Q")
DEFAULT_REGION_BYTES = 256 << 20


@dataclass(slots=True)
class Extent:
    """An allocation: ``length`` bytes at ``offset`` of ``region`` (generation word included)."""

    region: int
    offset: int
    length: int
    generation: int
    refs: int = 1  # the entry that owns it, plus one per lease reading it
    payload_len: int = field(default=0)


class Arena:
    """First-fit allocator with coalescing free lists, one per region. Not thread-safe
    (the store calls it under its own lock)."""

    def __init__(self, capacity_bytes: int, region_bytes: int = DEFAULT_REGION_BYTES):
        if capacity_bytes <= 0 or region_bytes <= 0:
            raise ValueError("arena capacity and region size must be positive")
        region_bytes = _round(min(region_bytes, capacity_bytes))
        n = -(-capacity_bytes // region_bytes)
        self.region_bytes = region_bytes
        self._maps = [mmap.mmap(-1, region_bytes) for _ in range(n)]
        self.views = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
        self.bases = [int(v.ctypes.data) for v in self.views]  # regions never move
        self._free: list[list[list[int]]] = [[[0, region_bytes]] for _ in range(n)]
        self._gens = itertools.count(1)
        self.allocated = 0

    @property
    def capacity(self) -> int:
        return self.region_bytes * len(self._maps)

    def base_address(self, region: int) -> int:
        return self.bases[region]

    def regions(self) -> list[tuple[int, int]]:
        """(address, length) of every region, for registration."""
        return [(self.base_address(i), self.region_bytes) for i in range(len(self._maps))]

    def alloc(self, payload_len: int) -> Extent | None:
        """An extent for ``payload_len`` bytes (plus its generation word), or None if full."""
        need = _round(payload_len + GEN_BYTES)
        for r, free in enumerate(self._free):
            for i, (off, ln) in enumerate(free):
                if ln >= need:
                    if ln == need:
                        free.pop(i)
                    else:
                        free[i] = [off + need, ln - need]
                    self.allocated += need
                    gen = next(self._gens)
                    _GEN.pack_into(self._maps[r], off, gen)
                    return Extent(r, off, need, gen, payload_len=payload_len)
        return None

    def write(self, ext: Extent, data: bytes | memoryview) -> memoryview:
        """Copy the payload in; returns a view of the stored payload bytes."""
        start = ext.offset + GEN_BYTES
        view = memoryview(self._maps[ext.region])[start:start + ext.payload_len]
        view[:] = data
        return view

    def payload(self, ext: Extent) -> memoryview:
        start = ext.offset + GEN_BYTES
        return memoryview(self._maps[ext.region])[start:start + ext.payload_len]

    def free(self, ext: Extent) -> None:
        """Return the extent and zero its generation word (stale readers see the change)."""
        _GEN.pack_into(self._maps[ext.region], ext.offset, 0)
        free = self._free[ext.region]
        off, ln = ext.offset, ext.length
        i = bisect.bisect_left(free, [off, 0])
        if i < len(free) and off + ln == free[i][0]:  # merge with the next free run
            ln += free[i][1]
            free.pop(i)
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # and with the previous one
            free[i - 1][1] += ln
        else:
            free.insert(i, [off, ln])
        self.allocated -= ext.length

    def largest_free(self) -> int:
        return max((ln for free in self._free for _, ln in free), default=0)

    def close(self) -> None:
        self.views = []
        for m in self._maps:
            with contextlib.suppress(BufferError):  # still viewed: goes with the last view
                m.close()


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def generation_at(buf: bytes | memoryview, pos: int = 0) -> int:
    return _GEN.unpack_from(buf, pos)[0]
