"""The arena allocator and the arena-backed store: same behaviour as the plain memory store
(its whole test module is run again against it), plus leases, reservations and reuse."""

from __future__ import annotations

import random
import time

import pytest

import tests.unit.test_memory_backend as plain
from kvtier.backends.arena import GEN_BYTES, Arena, generation_at
from kvtier.backends.arena_store import ArenaMemoryBackend, checksum
from kvtier.backends.base import PutItem
from tests.unit.test_memory_backend import *  # noqa: F403 - rerun every plain-store test

_PLAIN_TESTS = [n for n in dir(plain) if n.startswith("test_")]
del test_memory_url_is_a_per_process_singleton_per_url  # noqa: F821 - about memory:// URLs


@pytest.fixture(autouse=True)
def _arena_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-exported plain tests build ``MemoryBackend``: make that the arena store."""
    monkeypatch.setattr(plain, "MemoryBackend", ArenaMemoryBackend)


def test_plain_tests_really_rerun() -> None:
    assert len(_PLAIN_TESTS) > 15
    assert plain.MemoryBackend is ArenaMemoryBackend


def test_arena_first_fit_coalesces_and_zeroes_generation() -> None:
    a = Arena(4096, region_bytes=1024)
    assert a.capacity == 4096 and len(a.regions()) == 4
    exts = [a.alloc(100) for _ in range(8)]  # 128 bytes each: 8 per region
    assert all(e is not None for e in exts)
    assert len({e.generation for e in exts}) == 8  # type: ignore[union-attr]
    a.write(exts[1], b"x" * 100)  # type: ignore[arg-type]
    assert generation_at(a.views[0], exts[1].offset) == exts[1].generation  # type: ignore[union-attr]
    for e in exts[:3]:
        a.free(e)  # type: ignore[arg-type]
    assert generation_at(a.views[0], exts[1].offset) == 0  # type: ignore[union-attr]
    big = a.alloc(3 * 128 - GEN_BYTES)  # fits only if the three runs merged
    assert big is not None and big.offset == 0 and big.region == 0
    assert a.alloc(2000) is None  # larger than a region


def test_arena_random_alloc_free_never_overlaps() -> None:
    rng = random.Random(0)
    a = Arena(1 << 20, region_bytes=256 << 10)
    live: list = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            e = a.alloc(rng.randint(1, 20000))
            if e is not None:
                live.append(e)
        spans = sorted((e.region, e.offset, e.offset + e.length) for e in live)
        for (r1, _, end1), (r2, start2, _) in zip(spans, spans[1:]):
            assert r1 != r2 or end1 <= start2
    assert a.allocated == sum(e.length for e in live)
    for e in live:
        a.free(e)
    assert a.allocated == 0 and a.largest_free() == a.region_bytes


def _item(key: bytes, size: int = 1000, parent: bytes | None = None, fill: bytes = b"v") -> PutItem:
    return PutItem(key, (fill * size)[:size], parent)


def test_locate_points_at_the_payload_and_lease_blocks_eviction() -> None:
    b = ArenaMemoryBackend(3000)
    b.put_many([_item(b"a"), _item(b"b")])
    lease, locs = b.locate([b"a", b"zz"], lease_s=10)
    loc = locs[0]
    assert lease and locs[1] is None and loc is not None
    view = b.arena.views[loc.region]
    assert generation_at(view, loc.offset) == loc.generation
    payload = bytes(view[loc.offset + GEN_BYTES:loc.offset + GEN_BYTES + 1000])
    assert payload == b"v" * 1000 and checksum(payload) == loc.checksum
    # Pressure: "a" is the LRU leaf but leased, so "b" goes instead.
    assert b.put_many([_item(b"c"), _item(b"d")]) == 2
    assert b.contains_many([b"a", b"b"]) == [True, False]
    assert b.release(lease) and not b.release(lease)
    b.put_many([_item(b"e")])
    assert b.contains_many([b"a"]) == [False]  # evictable again once released


def test_replacing_or_deleting_a_leased_entry_leaves_the_leased_bytes() -> None:
    from kvtier.payload import put_verdict  # noqa: F401 - raw keys: last writer wins

    b = ArenaMemoryBackend(1 << 20)
    b.put_many([_item(b"k", fill=b"1")])
    lease, (loc,) = b.locate([b"k"], lease_s=10)
    b.put_many([_item(b"k", fill=b"2")])
    assert b.get_many([b"k"]) == [b"2" * 1000]
    view = b.arena.views[loc.region]  # type: ignore[union-attr]
    assert generation_at(view, loc.offset) == loc.generation  # type: ignore[union-attr]
    b.delete_many([b"k"])
    assert generation_at(view, loc.offset) == loc.generation  # type: ignore[union-attr]
    b.release(lease)
    assert generation_at(view, loc.offset) == 0  # type: ignore[union-attr]
    assert b.arena.allocated == 0


def test_lease_expires() -> None:
    b = ArenaMemoryBackend(2500)
    b.put_many([_item(b"a")])
    lease, _ = b.locate([b"a"], lease_s=0.05)
    time.sleep(0.1)
    b.put_many([_item(b"b"), _item(b"c")])  # needs a's room: the lease has run out
    assert b.contains_many([b"a"]) == [False]
    assert b.stats().extra["leases_expired"] == 1
    assert not b.release(lease)


def test_reserve_commit_and_expiry() -> None:
    b = ArenaMemoryBackend(1 << 20)
    rid, locs = b.reserve([1000, 500], ttl_s=10)
    data = [b"w" * 1000, b"u" * 500]
    for loc, d in zip(locs, data):
        start = loc.offset + GEN_BYTES  # type: ignore[union-attr]
        b.arena.views[loc.region][start:start + len(d)] = memoryview(d)  # type: ignore[union-attr]
    stored = b.commit(rid, [(0, b"p", None, checksum(data[0])),
                            (1, b"q", b"p", checksum(b"not what was written"))])
    assert stored == (1, 1000) and b.get_many([b"p", b"q"]) == [data[0], None]
    assert b.commit(rid, []) == (0, 0)  # a reservation commits once
    rid, _ = b.reserve([1000], ttl_s=0.05)
    time.sleep(0.1)
    b.locate([b"p"], lease_s=1)  # any call sweeps
    assert b.commit(rid, [(0, b"r", None, 0)]) == (0, 0)
    assert b.arena.allocated == _allocated_for(b, [b"p"])


def _allocated_for(b: ArenaMemoryBackend, keys: list[bytes]) -> int:
    with b._lock:
        return sum(b._entries[k].ext.length for k in keys)  # type: ignore[union-attr]
