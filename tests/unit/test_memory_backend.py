"""MemoryBackend: a byte-bounded, thread-safe store whose eviction respects block prefixes."""

from __future__ import annotations

import random
import threading
import uuid

import pytest

from kvtier.backends import open_backend
from kvtier.backends.base import BackendError, PutItem
from kvtier.backends.eviction import POLICIES, LeafFIFO, LeafLRU, make_policy
from kvtier.backends.memory import MemoryBackend
from tests.helpers import bad_entries

UNIT = 100  # bytes per value in most tests


def _v(tag: bytes | str, size: int = UNIT) -> bytes:
    tag = tag.encode() if isinstance(tag, str) else tag
    return (tag * (size // max(1, len(tag)) + 1))[:size]


def _keys(b: MemoryBackend) -> set[bytes]:
    return {e.key for e in b.scan()}


def _chain(name: str, n: int, size: int = UNIT) -> list[PutItem]:
    """``n`` blocks of one prefix, each the child of the one before."""
    items, parent = [], None
    for i in range(n):
        k = f"{name}/{i:04d}".encode()
        items.append(PutItem(k, _v(k, size), parent))
        parent = k
    return items


def _assert_invariants(b: MemoryBackend, parents: dict[bytes, bytes | None]) -> None:
    """Bytes bounded and accounted; every surviving child's parent survives; child counts right."""
    entries = {e.key: e for e in b.scan()}
    s = b.stats()
    assert s.bytes_used <= s.capacity_bytes
    assert s.bytes_used == sum(e.size for e in entries.values())
    assert s.entries == len(entries)
    expected_children: dict[bytes, int] = {}
    for k in entries:
        p = parents.get(k)
        if p is not None:
            assert p in entries, f"{k!r} survived but its parent {p!r} was evicted"
            expected_children[p] = expected_children.get(p, 0) + 1
    for k, e in entries.items():
        assert e.children == expected_children.get(k, 0), k


# -- basics ------------------------------------------------------------------------------------
def test_put_get_contains_round_trip() -> None:
    b = MemoryBackend(10 * UNIT)
    items = [PutItem(f"k{i}".encode(), _v(f"v{i}")) for i in range(5)]
    assert b.put_many(items) == 5
    got = b.get_many([b"k3", b"missing", b"k0"])
    assert got == [_v("v3"), None, _v("v0")]
    assert b.contains_many([b"k1", b"nope", b"k4"]) == [True, False, True]
    s = b.stats()
    assert (s.backend, s.entries, s.bytes_used, s.puts) == ("memory", 5, 5 * UNIT, 5)
    assert (s.hits, s.misses) == (2, 1)
    assert b.get_many([]) == [] and b.contains_many([]) == []


def test_capacity_must_be_positive() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            MemoryBackend(bad)


def test_capacity_never_exceeded_after_many_puts() -> None:
    rng = random.Random(1)
    cap = 50_000
    b = MemoryBackend(cap)
    parents: dict[bytes, bytes | None] = {}
    for round_ in range(200):
        items = []
        parent = None
        for i in range(rng.randint(1, 12)):
            k = f"r{round_}/{i}".encode()
            items.append(PutItem(k, b"x" * rng.randint(1, 4000), parent))
            parents[k] = parent
            parent = k
        b.put_many(items)
        s = b.stats()
        assert s.bytes_used <= cap
    s = b.stats()
    assert s.evictions > 0
    assert s.bytes_used > cap // 2  # it does get used
    _assert_invariants(b, parents)


def test_oversize_item_rejected_and_counted() -> None:
    b = MemoryBackend(10 * UNIT)
    assert b.put_many([PutItem(b"small", _v("s"))]) == 1
    assert b.put_many([PutItem(b"huge", b"x" * (10 * UNIT + 1))]) == 0
    assert b.contains_many([b"huge", b"small"]) == [False, True]  # nothing evicted for it
    s = b.stats()
    assert s.extra["rejected"] == 1
    assert s.evictions == 0
    # exactly the capacity fits (evicting the rest)
    assert b.put_many([PutItem(b"full", b"x" * (10 * UNIT))]) == 1
    assert _keys(b) == {b"full"}


def test_reput_of_a_sound_block_keeps_it_and_does_not_double_count() -> None:
    b = MemoryBackend(1 << 20)
    key = bad_entries.block_key()
    first, second = bad_entries.good(key), bad_entries.good(key)  # same key, other bytes
    b.put_many([PutItem(key.encode(), first)])
    for again in (first, second):
        assert b.put_many([PutItem(key.encode(), again)]) == 1  # reported as stored
        assert b.get_many([key.encode()]) == [first]  # same key, same meaning: first kept
    # a bad value is refused, never stored over a sound one
    assert b.put_many([PutItem(key.encode(), bad_entries.bad("corrupt", key))]) == 0
    assert b.get_many([key.encode()]) == [first]
    s = b.stats()
    assert (s.entries, s.bytes_used, s.puts, s.extra["replaced"]) == (1, len(first), 1, 0)
    assert s.extra["rejected"] == 1


def test_raw_keys_last_writer_wins_without_double_counting() -> None:
    b = MemoryBackend(10 * UNIT)
    b.put_many([PutItem(b"a", _v("first"))])
    assert b.put_many([PutItem(b"a", _v("second"))]) == 1
    assert b.get_many([b"a"]) == [_v("second")]  # not a block key: nothing to validate
    s = b.stats()
    assert (s.entries, s.bytes_used, s.extra["replaced"]) == (1, UNIT, 1)


@pytest.mark.parametrize("kind", bad_entries.BAD_KINDS)
def test_save_over_a_bad_entry_replaces_it(kind: str) -> None:
    b = MemoryBackend(1 << 20)
    key = bad_entries.block_key()
    k = key.encode()
    assert b.put_many([PutItem(k, bad_entries.bad(kind, key))]) == 1
    fresh = bad_entries.good(key)
    assert b.put_many([PutItem(k, fresh)]) == 1
    assert b.get_many([k]) == [fresh]
    s = b.stats()
    assert (s.entries, s.bytes_used, s.extra["replaced"]) == (1, len(fresh), 1)


def test_replacing_keeps_parent_links_and_leaf_only_eviction() -> None:
    """A replaced parent keeps its children (never evicted before them); a replaced
    child moves its link to the parent the new item names."""
    attn = [bad_entries.block_key(3, f"a{i}") for i in range(2)]
    state = bad_entries.block_key(0, "s1")
    vals = {k: bad_entries.good(k) for k in (*attn, state)}
    size = len(vals[state])
    b = MemoryBackend(4 * size)
    a0, a1, s1 = (k.encode() for k in (*attn, state))
    b.put_many([PutItem(a0, bad_entries.bad("corrupt", attn[0])),
                PutItem(a1, vals[attn[1]], a0), PutItem(s1, bad_entries.bad("corrupt", state))])
    # the good copies: a0 replaced in place, s1 replaced and now hung on a1
    assert b.put_many([PutItem(a0, vals[attn[0]]), PutItem(s1, vals[state], a1)]) == 2
    children = {e.key: e.children for e in b.scan()}
    assert children == {a0: 1, a1: 1, s1: 0}
    # fill up: only leaves go, children before parents, the replaced ones included
    for i in range(6):
        b.put_many([PutItem(f"filler{i}".encode(), _v("f", size))])
        _assert_invariants(b, {a1: a0, s1: a1})
    assert b.contains_many([a0, a1, s1]) == [False] * 3  # leaves in turn, children first


def test_replacement_that_does_not_fit_keeps_the_old_entry_evictable() -> None:
    key = bad_entries.block_key()
    k = key.encode()
    small = bad_entries.bad("truncated", key)
    b = MemoryBackend(len(small) + 50)
    b.put_many([PutItem(k, small)])
    assert b.put_many([PutItem(k, bad_entries.good(key))]) == 0  # larger than the store
    assert b.get_many([k]) == [small]
    assert b.stats().extra["rejected"] == 1
    assert b.put_many([PutItem(b"other", b"x" * len(small))]) == 1  # the old one was a leaf
    assert b.contains_many([k]) == [False]


def test_reput_refreshes_lru_position() -> None:
    b = MemoryBackend(3 * UNIT)
    b.put_many([PutItem(k, _v(k)) for k in (b"a", b"b", b"c")])
    b.put_many([PutItem(b"a", _v(b"a"))])  # refresh a
    b.put_many([PutItem(b"d", _v(b"d"))])
    assert _keys(b) == {b"a", b"c", b"d"}


# -- eviction order ----------------------------------------------------------------------------
def test_lru_among_leaves_get_protects() -> None:
    b = MemoryBackend(4 * UNIT)
    b.put_many([PutItem(k, _v(k)) for k in (b"a", b"b", b"c", b"d")])
    assert b.get_many([b"a", b"b"]) == [_v(b"a"), _v(b"b")]  # a, b now most recent
    b.put_many([PutItem(b"e", _v(b"e"))])
    assert _keys(b) == {b"a", b"b", b"d", b"e"}  # c was least recently used
    b.put_many([PutItem(b"f", _v(b"f"))])
    assert _keys(b) == {b"a", b"b", b"e", b"f"}
    b.get_many([b"a"])
    b.put_many([PutItem(b"g", _v(b"g")), PutItem(b"h", _v(b"h"))])
    assert _keys(b) == {b"a", b"f", b"g", b"h"}
    assert b.stats().evictions == 4


def test_misses_do_not_touch_anything() -> None:
    b = MemoryBackend(2 * UNIT)
    b.put_many([PutItem(b"a", _v(b"a")), PutItem(b"b", _v(b"b"))])
    b.get_many([b"zz"])
    b.contains_many([b"a"])  # contains is not a use
    b.put_many([PutItem(b"c", _v(b"c"))])
    assert _keys(b) == {b"b", b"c"}


def test_fifo_differs_from_lru() -> None:
    def run(policy: str) -> set[bytes]:
        b = MemoryBackend(3 * UNIT, policy=policy)
        b.put_many([PutItem(k, _v(k)) for k in (b"a", b"b", b"c")])
        b.get_many([b"a"])  # a read: refreshes under LRU only
        b.put_many([PutItem(b"a", _v(b"a"))])  # re-put: same
        b.put_many([PutItem(b"d", _v(b"d"))])
        assert b.stats().extra["policy"] == policy
        return _keys(b)

    assert run("lru") == {b"a", b"c", b"d"}
    assert run("fifo") == {b"b", b"c", b"d"}


def test_policy_instance_accepted() -> None:
    b = MemoryBackend(2 * UNIT, policy=LeafFIFO())
    assert b.stats().extra["policy"] == "fifo"
    assert isinstance(make_policy("lru"), LeafLRU)
    assert set(POLICIES) == {"lru", "fifo", "value"}


def test_unknown_policy_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'random'") as ei:
        MemoryBackend(UNIT, policy="random")
    assert "fifo" in str(ei.value) and "lru" in str(ei.value)


# -- prefix-aware eviction ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_parent_never_evicted_while_child_exists(policy: str) -> None:
    rng = random.Random(7)
    b = MemoryBackend(40 * UNIT, policy=policy)
    parents: dict[bytes, bytes | None] = {}
    chains = [_chain(f"c{i}", rng.randint(2, 15)) for i in range(30)]
    for chain in chains:
        for it in chain:
            parents[it.key] = it.parent
        b.put_many(chain)
        if rng.random() < 0.5:  # read some blocks of an older chain
            old = rng.choice(chains)
            b.get_many([it.key for it in old[: rng.randint(1, len(old))]])
        _assert_invariants(b, parents)
    assert b.stats().evictions > 100
    # chains are eaten from the tail: what survives of a chain is a prefix of it
    alive = _keys(b)
    for chain in chains:
        present = [it.key in alive for it in chain]
        assert present == sorted(present, reverse=True), chain[0].key


def test_state_on_attention_block_protects_the_attention_block() -> None:
    # a recurrent state (leaf) sits on an attention block: the block stays while the state does
    b = MemoryBackend(3 * UNIT)
    b.put_many([PutItem(b"attn0", _v(b"A")), PutItem(b"state0", _v(b"S"), b"attn0")])
    b.get_many([b"state0"])
    b.put_many([PutItem(b"other", _v(b"o"))])
    b.put_many([PutItem(b"other2", _v(b"p"))])  # must evict: the state (leaf), not attn0
    assert _keys(b) == {b"attn0", b"other", b"other2"}


def test_inserting_a_child_never_evicts_its_own_parent() -> None:
    b = MemoryBackend(2 * UNIT)
    b.put_many([PutItem(b"p", _v(b"p"))])
    b.put_many([PutItem(b"x", _v(b"x"))])
    b.get_many([b"x"])  # p is now the least recently used leaf
    assert b.put_many([PutItem(b"c", _v(b"c"), b"p")]) == 1
    assert _keys(b) == {b"p", b"c"}  # x went, not the parent
    s = b.stats()
    assert s.evictions == 1


def test_child_rejected_when_only_its_ancestors_could_make_room() -> None:
    b = MemoryBackend(2 * UNIT)
    assert b.put_many([PutItem(b"a", _v(b"a")), PutItem(b"b", _v(b"b"), b"a")]) == 2
    # room for c only by evicting b (c's parent) or a (b's parent): refuse instead
    assert b.put_many([PutItem(b"c", _v(b"c"), b"b")]) == 0
    assert _keys(b) == {b"a", b"b"}
    s = b.stats()
    assert s.extra["rejected"] == 1 and s.evictions == 0
    # the failed link was undone: b is still a leaf, evictable for an unrelated put
    assert next(e for e in b.scan(b"b")).children == 0
    assert b.put_many([PutItem(b"z", _v(b"z"))]) == 1
    assert _keys(b) == {b"a", b"z"}


def test_parent_released_when_last_child_goes() -> None:
    b = MemoryBackend(3 * UNIT)
    b.put_many([PutItem(b"p", _v(b"p")), PutItem(b"c1", _v(b"1"), b"p"),
                PutItem(b"c2", _v(b"2"), b"p")])
    assert next(e for e in b.scan(b"p")).children == 2
    b.delete_many([b"c1"])
    assert next(e for e in b.scan(b"p")).children == 1
    b.delete_many([b"c2"])
    assert next(e for e in b.scan(b"p")).children == 0
    b.put_many([PutItem(k, _v(k)) for k in (b"x", b"y", b"z")])
    assert b"p" not in _keys(b)  # oldest leaf again


def test_missing_parent_is_not_linked() -> None:
    b = MemoryBackend(2 * UNIT)
    assert b.put_many([PutItem(b"c", _v(b"c"), b"not-stored")]) == 1
    b.put_many([PutItem(b"x", _v(b"x")), PutItem(b"y", _v(b"y"))])
    assert _keys(b) == {b"x", b"y"}  # c was an ordinary leaf


def test_parent_deleted_and_stored_again_is_not_unlinked_by_old_children() -> None:
    """An orphan's stale parent link must not corrupt the child count of a new entry
    stored under the parent's key (which would let it be evicted before its child)."""
    b = MemoryBackend(10 * UNIT)
    b.put_many([PutItem(b"A", _v(b"A")), PutItem(b"B", _v(b"B"), b"A")])
    b.delete_many([b"A"])  # explicit delete orphans B
    b.put_many([PutItem(b"A", _v(b"A"))])  # A again: a new entry, no children
    b.delete_many([b"B"])  # the orphan goes: must not touch the new A
    assert next(e for e in b.scan(b"A")).children == 0
    b.put_many([PutItem(b"C", _v(b"C"), b"A")])
    assert next(e for e in b.scan(b"A")).children == 1
    b.get_many([b"C"])
    b.put_many([PutItem(f"F{i}".encode(), _v(b"F")) for i in range(9)])
    parents = {b"C": b"A"}
    _assert_invariants(b, parents)
    assert b.stats().evictions == 1
    assert b"A" in _keys(b)


# -- pin ---------------------------------------------------------------------------------------
def test_pin_protects_and_unpin_releases() -> None:
    b = MemoryBackend(3 * UNIT)
    b.put_many([PutItem(k, _v(k)) for k in (b"a", b"b", b"c")])
    assert b.pin([b"a", b"missing"]) == 1  # counts keys that exist
    assert b.stats().pinned == 1
    assert next(e for e in b.scan(b"a")).pinned
    for i in range(10):
        b.put_many([PutItem(f"n{i}".encode(), _v(b"n"))])
    assert b"a" in _keys(b)
    assert b.pin([b"a"], pinned=False) == 1
    assert b.stats().pinned == 0
    b.get_many([b"n9"])
    b.put_many([PutItem(b"z1", _v(b"z")), PutItem(b"z2", _v(b"z"))])
    assert b"a" not in _keys(b)


def test_all_pinned_means_puts_are_rejected() -> None:
    b = MemoryBackend(2 * UNIT)
    b.put_many([PutItem(b"a", _v(b"a")), PutItem(b"b", _v(b"b"))])
    b.pin([b"a", b"b"])
    assert b.put_many([PutItem(b"c", _v(b"c"))]) == 0
    assert _keys(b) == {b"a", b"b"}
    b.pin([b"b"], pinned=False)
    assert b.put_many([PutItem(b"c", _v(b"c"))]) == 1
    assert _keys(b) == {b"a", b"c"}


def test_unpinned_parent_with_children_stays_until_children_go() -> None:
    b = MemoryBackend(3 * UNIT)
    b.put_many([PutItem(b"p", _v(b"p")), PutItem(b"c", _v(b"c"), b"p")])
    b.pin([b"p"])
    b.pin([b"p"], pinned=False)
    b.put_many([PutItem(b"x", _v(b"x"))])
    b.put_many([PutItem(b"y", _v(b"y"))])  # evicts c (oldest leaf), p stays (had a child)
    assert _keys(b) == {b"p", b"x", b"y"}
    b.put_many([PutItem(b"z", _v(b"z"))])  # now p is the oldest leaf
    assert _keys(b) == {b"x", b"y", b"z"}


# -- delete / flush / scan ---------------------------------------------------------------------
def test_delete_many_counts_existing() -> None:
    b = MemoryBackend(10 * UNIT)
    b.put_many([PutItem(k, _v(k)) for k in (b"a", b"b", b"c")])
    assert b.delete_many([b"a", b"zz", b"a", b"c"]) == 2
    assert _keys(b) == {b"b"}
    assert b.stats().bytes_used == UNIT
    assert b.delete_many([]) == 0


def test_flush_prefix_and_all() -> None:
    b = MemoryBackend(100 * UNIT)
    b.put_many(_chain("ns1", 5) + _chain("ns2", 4) + _chain("ns10", 3))
    assert b.flush(b"ns1/") == 5
    assert all(not k.startswith(b"ns1/") for k in _keys(b))
    assert len(_keys(b)) == 7
    assert b.flush() == 7
    s = b.stats()
    assert (s.entries, s.bytes_used) == (0, 0)
    # the store keeps working after a flush
    assert b.put_many(_chain("ns1", 2)) == 2


def test_scan_prefix_limit_sorted_and_sizes() -> None:
    b = MemoryBackend(100 * UNIT)
    keys = [f"p/{i:03d}".encode() for i in range(20)]
    rng = random.Random(3)
    order = keys[:]
    rng.shuffle(order)
    b.put_many([PutItem(k, b"x" * (10 + i)) for i, k in enumerate(order)])
    b.put_many([PutItem(b"q/000", b"y")])
    got = list(b.scan(b"p/"))
    assert [e.key for e in got] == keys  # sorted by key
    sizes = {k: 10 + i for i, k in enumerate(order)}
    assert all(e.size == sizes[e.key] for e in got)
    assert [e.key for e in b.scan(b"p/", limit=5)] == keys[:5]
    assert list(b.scan(b"p/", limit=0)) == []
    assert [e.key for e in b.scan(b"q/")] == [b"q/000"]
    assert list(b.scan(b"nothing")) == []
    assert len(list(b.scan())) == 21


def test_scan_reports_children_and_pins() -> None:
    b = MemoryBackend(10 * UNIT)
    b.put_many(_chain("c", 3))
    b.pin([b"c/0002"])
    info = {e.key: e for e in b.scan()}
    assert [info[k].children for k in (b"c/0000", b"c/0001", b"c/0002")] == [1, 1, 0]
    assert [info[k].pinned for k in (b"c/0000", b"c/0001", b"c/0002")] == [False, False, True]


def test_pinning_not_supported_message_on_base_backend() -> None:
    from kvtier.backends.base import Backend

    class Dummy(Backend):
        name = "dummy"
        get_many = put_many = contains_many = delete_many = scan = stats = None  # type: ignore

    with pytest.raises(BackendError, match="dummy backend does not support pinning"):
        Dummy().pin([b"k"])


# -- concurrency -------------------------------------------------------------------------------
def test_thread_safety_smoke() -> None:
    cap = 200 * UNIT
    b = MemoryBackend(cap)
    parents: dict[bytes, bytes | None] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def writer(tid: int) -> None:
        rng = random.Random(tid)
        try:
            start.wait()
            for r in range(150):
                chain = _chain(f"t{tid}/r{r}", rng.randint(1, 8), size=rng.randint(50, 150))
                with lock:
                    parents.update({it.key: it.parent for it in chain})
                b.put_many(chain)
                got = b.get_many([it.key for it in chain])
                for it, v in zip(chain, got, strict=True):
                    assert v is None or v == it.value  # never someone else's bytes
                if r % 10 == 0:
                    b.delete_many([chain[-1].key])
                    list(b.scan(f"t{tid}/".encode(), limit=5))
                    b.pin([chain[0].key], pinned=bool(r % 20))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(300):
                b.stats()
                b.contains_many([f"t0/r{i}/0000".encode() for i in range(50)])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(5)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    b.pin([e.key for e in b.scan()], pinned=False)
    _assert_invariants(b, parents)
    assert b.stats().evictions > 0


# -- factory -----------------------------------------------------------------------------------
def test_memory_url_is_a_per_process_singleton_per_url() -> None:
    url = f"memory://test-{uuid.uuid4().hex}?capacity=1MiB&eviction=fifo"
    a = open_backend(url)
    assert open_backend(url) is a
    other = open_backend(f"memory://test-{uuid.uuid4().hex}?capacity=2MiB")
    assert other is not a
    assert isinstance(a, MemoryBackend)
    s, so = a.stats(), other.stats()
    assert (s.capacity_bytes, s.extra["policy"]) == (1 << 20, "fifo")
    assert (so.capacity_bytes, so.extra["policy"]) == (2 << 20, "value")
    a.put_many([PutItem(b"k", b"v")])
    assert open_backend(url).get_many([b"k"]) == [b"v"]
    assert other.get_many([b"k"]) == [None]


def test_memory_url_options_and_bad_values() -> None:
    b = open_backend(f"memory://test-{uuid.uuid4().hex}", capacity="3KiB", eviction="fifo")
    s = b.stats()
    assert (s.capacity_bytes, s.extra["policy"]) == (3 << 10, "fifo")
    with pytest.raises(ValueError, match="cannot parse size"):
        open_backend(f"memory://test-{uuid.uuid4().hex}?capacity=lots")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        open_backend(f"memory://test-{uuid.uuid4().hex}?eviction=mru")
    with pytest.raises(ValueError, match="supported scheme"):
        open_backend("mem://x")
