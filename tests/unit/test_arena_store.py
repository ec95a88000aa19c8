"""The arena allocator and the arena-backed store: same behaviour as the plain memory store
(its whole test module is run again against it, storing by put and by Reserve -> write ->
Commit as a NIXL writer does), plus leases, reservations, adoption of committed extents
and reuse."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import pytest

import tests.unit.test_memory_backend as plain
from kvtier.backends.arena import GEN_BYTES, Arena, generation_at
from kvtier.backends.arena_store import ArenaMemoryBackend, checksum
from kvtier.backends.base import PutItem
from kvtier.backends.eviction import EntryMeta, LeafValue
from tests.helpers import bad_entries
from tests.unit.test_memory_backend import *  # noqa: F403 - rerun every plain-store test

_PLAIN_TESTS = [n for n in dir(plain) if n.startswith("test_")]
del test_memory_url_is_a_per_process_singleton_per_url  # noqa: F821 - about memory:// URLs


class _CommittingStore(ArenaMemoryBackend):
    """Stores as a NIXL writer does: Reserve extents, write them, Commit."""

    def put_many(self, items: Sequence[PutItem]) -> int:
        rid, locs = self.reserve([len(it.value) for it in items], ttl_s=60)
        _write(self, locs, [it.value for it in items])
        return self.commit(rid, [(i, it.key, it.parent, checksum(it.value))
                                 for i, it in enumerate(items)])[0]


def _write(b: ArenaMemoryBackend, locs: Sequence, data: Sequence[bytes]) -> None:
    """What a NIXL WRITE does: the payloads into the reserved extents (None: no room)."""
    for loc, d in zip(locs, data):
        if loc is not None:
            start = loc.offset + GEN_BYTES
            b.arena.views[loc.region][start:start + len(d)] = memoryview(d)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ in _PLAIN_TESTS:
        metafunc.parametrize("store_cls", [ArenaMemoryBackend, _CommittingStore],
                             ids=["put", "commit"])


@pytest.fixture
def store_cls() -> type[ArenaMemoryBackend]:
    return ArenaMemoryBackend


@pytest.fixture(autouse=True)
def _arena_store(monkeypatch: pytest.MonkeyPatch, store_cls: type[ArenaMemoryBackend]) -> None:
    """The re-exported plain tests build ``MemoryBackend``: make that the arena store."""
    monkeypatch.setattr(plain, "MemoryBackend", store_cls)


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
    assert payload == b"v" * 1000
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
    _write(b, locs, data)
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


def test_commit_adopts_the_written_extents() -> None:
    """The entries are the extents NIXL wrote (same place, same generation): no copy."""
    b = ArenaMemoryBackend(1 << 20)
    data = [b"w" * 1000, b"u" * 500]
    rid, locs = b.reserve([1000, 500], ttl_s=10)
    _write(b, locs, data)
    reserved = b.arena.allocated
    assert b.commit(rid, [(0, b"p", None, checksum(data[0])),
                          (1, b"q", b"p", checksum(data[1]))]) == (2, 1500)
    assert b.arena.allocated == reserved == _allocated_for(b, [b"p", b"q"])
    _, found = b.locate([b"p", b"q"], lease_s=10)
    for loc, got, d in zip(locs, found, data):
        assert got is not None and loc is not None
        assert (got.region, got.offset, got.generation) == (loc.region, loc.offset, loc.generation)
        view = b.arena.views[got.region]
        assert bytes(view[got.offset + GEN_BYTES:got.offset + got.length]) == d
    s = b.stats()
    assert (s.entries, s.bytes_used, s.puts) == (2, 1500, 2)
    assert next(iter(b.scan(b"p"))).children == 1  # linked as put_many links


def test_commit_frees_what_it_does_not_adopt() -> None:
    """Indices not committed, a bad checksum, an unknown index, an index used twice."""
    b = ArenaMemoryBackend(1 << 20)
    data = [bytes([65 + i]) * 100 for i in range(4)]
    rid, locs = b.reserve([100] * 4, ttl_s=10)
    _write(b, locs, data)
    stored = b.commit(rid, [(1, b"a", None, checksum(data[1])), (1, b"b", None, checksum(data[1])),
                            (2, b"c", None, checksum(b"other")), (9, b"d", None, 0)])
    assert stored == (1, 100) and b.get_many([b"a", b"b", b"c"]) == [data[1], None, None]
    assert b.arena.allocated == _allocated_for(b, [b"a"])
    view = b.arena.views[0]
    gens = [generation_at(view, loc.offset) for loc in locs]  # type: ignore[union-attr]
    assert gens == [0, locs[1].generation, 0, 0]  # type: ignore[union-attr]
    assert b.stats().extra["rejected"] == 3


def test_commit_over_a_sound_block_keeps_it_and_frees_the_extent() -> None:
    """Put verdicts on commit: a bad payload is refused, an equal one is a no-op; the
    stored entry (its extent included) stays either way."""
    b = ArenaMemoryBackend(1 << 20)
    key = bad_entries.block_key()
    k, first = key.encode(), bad_entries.good(key)
    b.put_many([PutItem(k, first)])
    before = b.locate([k], lease_s=10)[1][0]
    for value, stored in ((bad_entries.bad("corrupt", key), 0), (bad_entries.good(key), 1)):
        rid, locs = b.reserve([len(value)], ttl_s=10)
        _write(b, locs, [value])
        assert b.commit(rid, [(0, k, None, checksum(value))])[0] == stored
        assert b.get_many([k]) == [first]
        assert b.locate([k], lease_s=10)[1][0] == before
        assert b.arena.allocated == _allocated_for(b, [k])
    s = b.stats()
    assert (s.entries, s.bytes_used, s.puts, s.extra["replaced"], s.extra["rejected"]) == \
        (1, len(first), 1, 0, 1)


def test_commit_replacing_a_leased_entry_leaves_the_leased_bytes() -> None:
    b = ArenaMemoryBackend(1 << 20)
    b.put_many([_item(b"k", fill=b"1")])
    lease, (old,) = b.locate([b"k"], lease_s=10)
    assert old is not None
    rid, locs = b.reserve([1000], ttl_s=10)
    _write(b, locs, [b"2" * 1000])
    assert b.commit(rid, [(0, b"k", None, checksum(b"2" * 1000))]) == (1, 1000)
    assert b.get_many([b"k"]) == [b"2" * 1000]
    view = b.arena.views[old.region]
    assert generation_at(view, old.offset) == old.generation
    assert bytes(view[old.offset + GEN_BYTES:old.offset + old.length]) == b"1" * 1000
    s = b.stats()
    assert (s.entries, s.bytes_used, s.extra["replaced"]) == (1, 1000, 1)
    b.release(lease)
    assert generation_at(view, old.offset) == 0
    assert b.arena.allocated == _allocated_for(b, [b"k"])


class _Recording(LeafValue):
    """The value policy, logging every hook the store calls."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []

    def added(self, key: bytes, meta: EntryMeta) -> None:
        self.log.append(("added", key, meta))
        super().added(key, meta)

    def touched(self, key: bytes) -> None:
        self.log.append(("touched", key))
        super().touched(key)

    def leaf(self, key: bytes) -> None:
        self.log.append(("leaf", key))
        super().leaf(key)

    def forget(self, key: bytes) -> None:
        self.log.append(("forget", key))
        super().forget(key)


def test_commit_and_put_make_the_same_store() -> None:
    """Under eviction pressure, with replacements, refusals and parents: the same entries,
    stats and policy hooks (value policy ``added`` metadata included) either way, and the
    arena holds exactly the entries' extents after every commit."""
    rng = random.Random(7)
    key = bad_entries.block_key()
    batches: list[list[PutItem]] = []
    for n in range(60):
        chain, parent = [], None
        for i in range(rng.randint(1, 4)):
            k = f"c{rng.randrange(12)}/{i}".encode()
            chain.append(PutItem(k, bytes([rng.randrange(256)]) * rng.randint(1, 5000), parent))
            parent = k
        if n % 7 == 0:  # pinned: a bad one stored, replaced by a sound one, then kept or refused
            chain.append(PutItem(key.encode(), bad_entries.good(key) if n % 2
                                 else bad_entries.bad("corrupt", key)))
        batches.append(chain)
    stores = [ArenaMemoryBackend(12000, _Recording()), _CommittingStore(12000, _Recording())]
    for batch in batches:
        assert stores[0].put_many(batch) == stores[1].put_many(batch)
        assert stores[0].pin([key.encode()]) == stores[1].pin([key.encode()])
        assert stores[1].arena.allocated == _allocated_for(stores[1], list(stores[1]._entries))
    by_put, by_commit = stores
    assert by_put.export() == by_commit.export()
    s, c = by_put.stats(), by_commit.stats()
    assert s.evictions > 0 and c.bytes_used <= c.capacity_bytes
    counts = ("rejected", "replaced", "arena_allocated")
    assert (s.entries, s.bytes_used, s.puts, s.evictions, *(s.extra[n] for n in counts)) == \
        (c.entries, c.bytes_used, c.puts, c.evictions, *(c.extra[n] for n in counts))
    assert by_put._policy.log == by_commit._policy.log  # type: ignore[attr-defined]
