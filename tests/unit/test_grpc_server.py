"""The tier server: a real ``kvtier serve`` subprocess, driven through GrpcBackend and raw gRPC."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvtier import payload
from kvtier.backends.base import BackendError, PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.backends.memory import MemoryBackend
from kvtier.keys import BlockKey, Namespace, fingerprint, namespace_prefix
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery, StopReason, deepest_restorable
from kvtier.proto import tier_pb2 as pb
from kvtier.proto import tier_pb2_grpc as pb_grpc
from kvtier.testing.tier_proc import TierProcess, free_port
from tests.helpers import bad_entries

ROOT = Path(__file__).resolve().parents[2]
PAGE = 196_608  # one block of one group in the tiny Qwen3-Next layout
LAYOUT = payload.layout_digest("qwen3next-tiny bf16 page=196608 block=384")
ATTN = 3
STATES = (0, 1, 2)
GROUPS = [GroupQuery(g, GroupKind.STATE) for g in STATES] + [GroupQuery(ATTN, GroupKind.ATTENTION)]
TIMEOUT = 1.0


# -- helpers -----------------------------------------------------------------------------------
def _client(url: str, **kw: Any) -> GrpcBackend:
    """A GrpcBackend; ``bulk`` is dropped if this client has no raw-TCP data plane."""
    if "bulk" not in inspect.signature(GrpcBackend.__init__).parameters:
        kw.pop("bulk", None)
    return GrpcBackend(url, **kw)


def _ns() -> bytes:
    return Namespace("tiny-qwen3next", fingerprint({"page": PAGE}), uuid.uuid4().hex).id


def _hashes(n: int, seed: bytes = b"root") -> list[bytes]:
    out, h = [], seed
    for i in range(n):
        h = hashlib.sha256(h + i.to_bytes(4, "little")).digest()
        out.append(h)
    return out


def _item(ns: bytes, group: int, h: bytes, parent: bytes | None = None,
          size: int = PAGE) -> PutItem:
    key = BlockKey(ns, 0, group, h)
    return PutItem(key.encode(), payload.encode(key, LAYOUT, os.urandom(size)), parent)


def _hybrid(ns: bytes, block_hashes: list[bytes], states_at: dict[int, list[int]],
            size: int = PAGE) -> tuple[list[PutItem], dict[bytes, bytes | None]]:
    """Attention chain over every block hash plus states (per group, 1-based boundaries)
    sitting on the attention block of their boundary, like the connector stores them."""
    items: list[PutItem] = []
    parent = None
    for h in block_hashes:
        it = _item(ns, ATTN, h, parent, size)
        items.append(it)
        parent = it.key
    for g, boundaries in states_at.items():
        for b in boundaries:
            h = block_hashes[b - 1]
            items.append(_item(ns, g, h, BlockKey(ns, 0, ATTN, h).encode(), size))
    return items, {it.key: it.parent for it in items}


def _res(r: Any) -> tuple:
    return (r.boundary, r.reason, [(d.boundary, d.num_hashes, dict(d.present), d.prefix_ok)
                                   for d in r.details])


def _rejected(fn: Callable[[], Any], *needles: str) -> str:
    with pytest.raises(BackendError) as ei:
        fn()
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


def _freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads is actually stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue  # a thread that just ended
        if states and all(st in "tT" for st in states):
            return
        time.sleep(0.01)
    raise RuntimeError(f"process {pid} did not stop")


def _timed_failure(fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    with pytest.raises(BackendError):
        fn()
    return time.monotonic() - t0


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tier() -> Iterator[TierProcess]:
    tp = TierProcess(capacity="1GiB").start()
    yield tp
    tp.stop()


@pytest.fixture(scope="module", params=["default", "grpc-streams"])
def client(request: pytest.FixtureRequest, tier: TierProcess) -> Iterator[GrpcBackend]:
    """The default client, and one reading over gRPC streams only (4 of them)."""
    kw: dict[str, Any] = {"timeout_s": 10.0, "streams": 4}
    if request.param == "grpc-streams":
        kw["bulk"] = False
    b = _client(tier.url, **kw)
    yield b
    b.close()


@pytest.fixture(scope="module")
def stub(tier: TierProcess) -> Iterator[pb_grpc.TierStub]:
    ch = grpc.insecure_channel(f"{tier.host}:{tier.port}")
    yield pb_grpc.TierStub(ch)
    ch.close()


# -- data path -----------------------------------------------------------------------------------
def test_health_and_server_info(client: GrpcBackend, tier: TierProcess) -> None:
    h = client.health()
    assert h["ok"] is True
    assert h["backend"] == "memory"
    assert h["version"]
    assert h["url"] == tier.url
    s = client.stats()
    assert s.backend == "memory"
    assert s.capacity_bytes == 1 << 30
    assert s.extra["policy"] == "value"  # the default
    assert s.extra["server_version"] == h["version"]
    assert s.extra["server_uptime_s"] >= 0


def test_put_get_round_trip_realistic_payloads(client: GrpcBackend) -> None:
    ns = _ns()
    hs = _hashes(16)
    items, _ = _hybrid(ns, hs, {g: list(range(1, 17)) for g in STATES})  # 64 blocks, ~12.6 MB
    assert len(items) == 64
    assert client.put_many(items) == 64
    got = client.get_many([it.key for it in items])
    assert len(got) == 64
    for it, v in zip(items, got, strict=True):
        assert v is not None
        assert bytes(v) == it.value
        data = payload.decode(v, BlockKey.decode(it.key), LAYOUT)
        assert data.nbytes == PAGE
    # re-put is counted as stored and keeps the bytes
    assert client.put_many(items[:3]) == 3
    assert [bytes(v) for v in client.get_many([it.key for it in items[:3]])] == \
        [it.value for it in items[:3]]


@pytest.mark.parametrize("kind", bad_entries.BAD_KINDS)
def test_save_over_a_bad_entry_replaces_it(client: GrpcBackend, kind: str) -> None:
    """Through the server process: a bad stored entry gives way to a sound save,
    and a bad put never displaces the sound entry."""
    key = bad_entries.block_key()
    k = key.encode()
    assert client.put_many([PutItem(k, bad_entries.bad(kind, key))]) == 1
    fresh = bad_entries.good(key)
    assert client.put_many([PutItem(k, fresh)]) == 1
    assert bytes(client.get_many([k])[0]) == fresh
    assert client.put_many([PutItem(k, bad_entries.bad("corrupt", key))]) == 0  # refused
    assert bytes(client.get_many([k])[0]) == fresh


def test_missing_keys_are_none_and_order_is_preserved(client: GrpcBackend) -> None:
    ns = _ns()
    items = [_item(ns, ATTN, h, size=rng_size) for h, rng_size in
             zip(_hashes(60), random.Random(1).choices(range(1, 300_000), k=60), strict=True)]
    assert client.put_many(items) == 60
    missing = [BlockKey(ns, 0, ATTN, h).encode() for h in _hashes(20, seed=b"absent")]
    want: list[tuple[bytes, bytes | None]] = [(it.key, it.value) for it in items]
    want += [(k, None) for k in missing]
    random.Random(2).shuffle(want)
    got = client.get_many([k for k, _ in want])  # 80 keys: split over 4 streams
    assert len(got) == len(want)
    for (k, v), g in zip(want, got, strict=True):
        if v is None:
            assert g is None, k
        else:
            assert g is not None and bytes(g) == v, k
    assert client.get_many(missing[:3]) == [None, None, None]
    assert client.get_many([]) == []


def test_small_chunks_and_many_streams_byte_exact(tier: TierProcess) -> None:
    ns = _ns()
    items = [_item(ns, ATTN, h, size=30_000 + i) for i, h in enumerate(_hashes(64))]
    with _client(tier.url, streams=4, chunk_bytes=4096, bulk=False, timeout_s=10.0) as b:
        assert b.put_many(items) == 64
        keys = [it.key for it in items][::-1]
        got = b.get_many(keys)
        assert [bytes(v) for v in got] == [it.value for it in items][::-1]


def test_raw_get_stream_framing(tier: TierProcess, stub: pb_grpc.TierStub) -> None:
    """Get's hand-framed chunks parse as ordinary GetChunk messages."""
    ns = _ns()
    items = [_item(ns, ATTN, h, size=10_000 * (i + 1)) for i, h in enumerate(_hashes(5))]
    with _client(tier.url) as b:
        b.put_many(items)
    absent = BlockKey(ns, 0, ATTN, b"\x07" * 32).encode()
    keys = [items[2].key, absent, items[0].key, items[4].key]
    chunks = list(stub.Get(pb.GetRequest(keys=keys, chunk_bytes=4096), timeout=10))
    assert list(chunks[0].sizes) == [len(items[2].value), -1, len(items[0].value),
                                     len(items[4].value)]
    assert not chunks[0].data
    assert all(len(c.data) <= 4096 and not c.sizes for c in chunks[1:])
    assert b"".join(c.data for c in chunks[1:]) == items[2].value + items[0].value + \
        items[4].value
    # nothing found: just the sizes
    chunks = list(stub.Get(pb.GetRequest(keys=[absent]), timeout=10))
    assert [list(c.sizes) for c in chunks] == [[-1]]


# -- lookup ----------------------------------------------------------------------------------------
def test_lookup_over_grpc_equals_in_process_lookup(client: GrpcBackend) -> None:
    ns = _ns()
    hs = _hashes(16)
    items, _ = _hybrid(ns, hs, {0: [2, 4, 8, 12, 16], 1: [2, 4, 8, 12, 16], 2: [2, 4, 8, 12]},
                       size=2048)
    local = MemoryBackend()
    assert client.put_many(items) == len(items) == local.put_many(items)
    evicted = [BlockKey(ns, 0, ATTN, hs[13]).encode()]  # attention block of boundary 14
    assert client.delete_many(evicted) == 1 == local.delete_many(evicted)

    def q(**kw: Any) -> LookupQuery:
        return LookupQuery(ns, 0, hs, 1, GROUPS, **kw)

    cases = {
        "default": q(),
        "start": q(start_boundary=4),
        "max": q(max_boundary=10),
        "max-at-a-state": q(max_boundary=12),
        "max-past-end": q(max_boundary=99),
        "start-and-max": q(start_boundary=5, max_boundary=9),
        "nothing": q(start_boundary=16),
        "other-rank": LookupQuery(ns, 1, hs, 1, GROUPS),
        "attention-only": LookupQuery(ns, 0, hs, 1, [GroupQuery(ATTN, GroupKind.ATTENTION)]),
        "no-hashes": LookupQuery(ns, 0, [], 1, GROUPS),
    }
    seen = set()
    for name, query in cases.items():
        for details in (True, False):
            want = deepest_restorable(query, local.contains_many, details)
            got = client.lookup(query, with_details=details)
            assert _res(got) == _res(want), name
            seen.add(want.reason)
    assert _res(client.lookup(q(), True))[:2] == (12, StopReason.MISSING_STATE)
    assert seen == set(StopReason) - {StopReason.TIER_UNAVAILABLE}  # that one is client-side


def test_lookup_with_24_hashes_per_block_over_grpc(client: GrpcBackend) -> None:
    # 16-token hashes, 384-token blocks: keys are every 24th hash
    ns = _ns()
    hs = _hashes(6 * 24 + 5)
    block_hashes = hs[23::24]
    items, _ = _hybrid(ns, block_hashes, {g: [2, 5, 6] for g in STATES}, size=1024)
    local = MemoryBackend()
    client.put_many(items)
    local.put_many(items)
    groups = [GroupQuery(g, GroupKind.STATE, 24) for g in STATES] + [
        GroupQuery(ATTN, GroupKind.ATTENTION, 24)]
    for kw in ({}, {"start_boundary": 2}, {"max_boundary": 4}):
        query = LookupQuery(ns, 0, hs, 24, groups, **kw)
        want = deepest_restorable(query, local.contains_many, True)
        assert _res(client.lookup(query, True)) == _res(want), kw
    assert client.lookup(LookupQuery(ns, 0, hs, 24, groups)).boundary == 6
    # 16-token attention blocks are not stored: a query that needs them misses at once
    fine = [GroupQuery(ATTN, GroupKind.ATTENTION, 1)]
    r = client.lookup(LookupQuery(ns, 0, hs, 24, fine))
    assert (r.boundary, r.reason) == (0, StopReason.MISSING_ATTENTION)


def test_lookup_rejects_mixed_hash_lengths_client_side(client: GrpcBackend) -> None:
    hs = _hashes(2)
    q = LookupQuery(_ns(), 0, [hs[0], hs[1][:16]], 1, GROUPS)
    with pytest.raises(ValueError, match="same length"):
        client.lookup(q)


def test_lookup_max_boundary_zero_over_grpc(client: GrpcBackend) -> None:
    """max_boundary 0 reads "no cap" on the wire: the client answers it without asking."""
    ns = _ns()
    hs = _hashes(3)
    items, _ = _hybrid(ns, hs, {g: [1, 2, 3] for g in STATES}, size=64)
    client.put_many(items)
    q = LookupQuery(ns, 0, hs, 1, GROUPS, max_boundary=0)
    r = client.lookup(q)
    assert (r.boundary, r.reason) == (0, StopReason.NOTHING_TO_LOOK_UP)
    assert client.lookup(LookupQuery(ns, 0, hs, 1, GROUPS, max_boundary=2)).boundary == 2


# -- admin -------------------------------------------------------------------------------------
def test_contains_delete_pin_scan_flush(client: GrpcBackend) -> None:
    ns, other = _ns(), _ns()
    items, _ = _hybrid(ns, _hashes(8), {0: [4, 8]}, size=1000)
    theirs, _ = _hybrid(other, _hashes(3), {}, size=10)
    assert client.put_many(items + theirs) == len(items) + len(theirs)
    keys = [it.key for it in items]
    absent = BlockKey(ns, 0, ATTN, b"\x00" * 32).encode()
    assert client.contains_many(keys + [absent]) == [True] * len(keys) + [False]
    assert client.contains_many([]) == []

    # scan: sorted, sizes, children, prefix and limit
    entries = list(client.scan(namespace_prefix(ns)))
    assert [e.key for e in entries] == sorted(keys)
    by_key = {e.key: e for e in entries}
    assert all(by_key[it.key].size == len(it.value) for it in items)
    attn4 = BlockKey(ns, 0, ATTN, _hashes(8)[3]).encode()
    assert by_key[attn4].children == 2  # next attention block + the state on it
    assert by_key[keys[7]].children == 1  # last attention block: its state
    assert len(list(client.scan(namespace_prefix(ns), limit=3))) == 3
    assert [e.key for e in client.scan(namespace_prefix(ns), limit=3)] == sorted(keys)[:3]

    # pin / unpin count existing keys and show in scan
    assert client.pin(keys[:3] + [absent]) == 3
    assert {e.key for e in client.scan(namespace_prefix(ns)) if e.pinned} == set(keys[:3])
    assert client.pin(keys[:3], pinned=False) == 3
    assert not any(e.pinned for e in client.scan(namespace_prefix(ns)))

    # delete
    assert client.delete_many(keys[5:7] + [absent]) == 2
    assert client.contains_many(keys[5:7]) == [False, False]
    assert client.delete_many([]) == 0

    # flush one namespace: the other one stays
    assert client.flush(namespace_prefix(ns)) == len(keys) - 2
    assert list(client.scan(namespace_prefix(ns))) == []
    assert all(client.contains_many([it.key for it in theirs]))
    assert client.flush(namespace_prefix(ns)) == 0


def test_stats_count_puts_hits_misses(tier: TierProcess) -> None:
    with _client(tier.url, bulk=False) as b:
        ns = _ns()
        items = [_item(ns, ATTN, h, size=5000) for h in _hashes(5)]
        before = b.stats()
        b.put_many(items)
        b.get_many([it.key for it in items[:3]] + [BlockKey(ns, 0, 0, b"\x01").encode()] * 2)
        after = b.stats()
    assert after.puts - before.puts == 5
    assert after.entries - before.entries == 5
    assert after.bytes_used - before.bytes_used == sum(len(it.value) for it in items)
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 2)


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_rejected_with_a_message_and_server_keeps_serving(
        client: GrpcBackend, tier: TierProcess) -> None:
    ns = _ns()
    items, _ = _hybrid(ns, _hashes(4), {g: [4] for g in STATES}, size=3000)
    client.put_many(items)
    hs = _hashes(4)

    msg = _rejected(lambda: client.contains_many([b"garbage"]), "not a kvtier block key",
                    "garbage")
    assert "rejected by tier" in msg and tier.url in msg
    _rejected(lambda: client.delete_many([items[0].key, b"kvt1:zz:0:0:00"]),
              "malformed kvtier block key")
    _rejected(lambda: client.pin([b"kvt1:00:x:0:00"]), "malformed kvtier block key")
    _rejected(lambda: list(client.scan(limit=-1)), "limit must be >= 0")
    _rejected(lambda: client.get_many([items[0].key, b"kvt1:nothex:0:0:00"]),
              "malformed kvtier block key")

    # a bad key in a put batch: nothing of that batch is stored
    good = _item(ns, ATTN, b"\x42" * 32, size=100)
    _rejected(lambda: client.put_many([good, PutItem(b"bogus", b"v")]),
              "not a kvtier block key", "bogus")
    _rejected(lambda: client.put_many([PutItem(good.key, good.value, b"bad-parent")]),
              "not a kvtier block key", "bad-parent")
    assert client.contains_many([good.key]) == [False]

    # lookups the server cannot answer
    short = LookupQuery(b"\x01" * 5, 0, hs, 1, GROUPS)
    _rejected(lambda: client.lookup(short), "namespace must be 16 bytes, got 5")
    q = LookupQuery(ns, 0, hs, 1, GROUPS)
    object.__setattr__(q, "groups", [GroupQuery(ATTN, GroupKind.ATTENTION, 0)])  # skip checks
    _rejected(lambda: client.lookup(q), "hashes_per_block 0 must divide")
    q = LookupQuery(ns, 0, hs, 1, GROUPS)
    object.__setattr__(q, "start_boundary", -2)
    _rejected(lambda: client.lookup(q), "start_boundary must be >= 0")

    # still serving, data intact
    assert client.health()["ok"] is True
    got = client.get_many([it.key for it in items])
    assert [bytes(v) for v in got] == [it.value for it in items]
    assert client.lookup(LookupQuery(ns, 0, hs, 1, GROUPS)).boundary == 4


def test_bad_get_over_grpc_streams(tier: TierProcess) -> None:
    with _client(tier.url, bulk=False) as b:
        _rejected(lambda: b.get_many([b"kvt1:nothex:0:0:00"]), "malformed kvtier block key")
        assert b.health()["ok"] is True


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: setattr(r, "namespace", b"\x00" * 17), "namespace must be 16 bytes, got 17"),
        (lambda r: setattr(r, "hash_len", 0), "hash_len must be 1..64, got 0"),
        (lambda r: setattr(r, "hash_len", 65), "hash_len must be 1..64, got 65"),
        (lambda r: setattr(r, "hashes_packed", r.hashes_packed + b"\x01"),
         "not a whole number of hashes"),
        (lambda r: r.ClearField("groups"), "at least one group query is required"),
        (lambda r: setattr(r.groups[0], "kind", pb.GROUP_KIND_UNSPECIFIED),
         "kind must be ATTENTION or STATE"),
        (lambda r: setattr(r.groups[1], "hashes_per_block", 0), "hashes_per_block 0"),
        (lambda r: setattr(r, "hashes_per_boundary", 0), "hashes_per_boundary must be positive"),
        (lambda r: setattr(r, "start_boundary", -1), "start_boundary must be >= 0"),
    ],
)
def test_raw_lookup_validation(stub: pb_grpc.TierStub, mutate: Callable, needle: str) -> None:
    req = pb.LookupRequest(
        namespace=_ns(), rank=0, hashes_packed=b"".join(_hashes(4)), hash_len=32,
        hashes_per_boundary=1,
        groups=[pb.GroupQuery(group_id=0, kind=pb.STATE, hashes_per_block=1),
                pb.GroupQuery(group_id=ATTN, kind=pb.ATTENTION, hashes_per_block=1)])
    assert stub.Lookup(req, timeout=10).reason == "missing_attention_block"  # valid as is
    mutate(req)
    with pytest.raises(grpc.RpcError) as ei:
        stub.Lookup(req, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in ei.value.details()


@pytest.mark.parametrize("chunk", [1, 4095, 600 << 20])
def test_raw_get_rejects_bad_chunk_size(stub: pb_grpc.TierStub, chunk: int) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Get(pb.GetRequest(keys=[], chunk_bytes=chunk), timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk_bytes must be 4 KiB" in ei.value.details()


# -- failures of the server itself -------------------------------------------------------------
def test_killed_server_gives_backend_error_within_timeout() -> None:
    tp = TierProcess(capacity="64MiB").start()
    try:
        b = _client(tp.url, timeout_s=TIMEOUT)
        ns = _ns()
        items, _ = _hybrid(ns, _hashes(3), {0: [3]}, size=1000)
        assert b.put_many(items) == len(items)
        assert b.get_many([items[0].key])[0] is not None  # connections are up
        hs = _hashes(3)
        tp.kill()
        calls = {
            "get": lambda: b.get_many([it.key for it in items]),
            "put": lambda: b.put_many(items),
            "lookup": lambda: b.lookup(LookupQuery(ns, 0, hs, 1, GROUPS)),
            "contains": lambda: b.contains_many([items[0].key]),
            "delete": lambda: b.delete_many([items[0].key]),
            "pin": lambda: b.pin([items[0].key]),
            "scan": lambda: list(b.scan()),
            "flush": lambda: b.flush(namespace_prefix(ns)),
            "stats": b.stats,
            "health": b.health,
        }
        for name, fn in calls.items():
            elapsed = _timed_failure(fn)
            assert elapsed < 3 * TIMEOUT, (name, elapsed)
        with _client(tp.url, timeout_s=TIMEOUT) as fresh:
            assert _timed_failure(fresh.health) < 3 * TIMEOUT

        # a restarted server on the same port: the same client recovers
        tp.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert b.health()["ok"] is True
                assert b.put_many(items) == len(items)
                assert bytes(b.get_many([items[0].key])[0]) == items[0].value
                break
            except BackendError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        b.close()
    finally:
        tp.kill()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_frozen_server_times_out() -> None:
    """A server that accepts connections but never answers: calls end near the deadline."""
    timeout = 0.5
    tp = TierProcess(capacity="64MiB").start()
    assert tp.proc is not None
    pid = tp.proc.pid
    try:
        b = _client(tp.url, timeout_s=timeout)
        ns = _ns()
        items, _ = _hybrid(ns, _hashes(2), {}, size=1000)
        b.put_many(items)
        b.get_many([items[0].key])
        _freeze(pid)
        hs = _hashes(2)
        for name, fn in {
            "get": lambda: b.get_many([it.key for it in items]),
            "lookup": lambda: b.lookup(LookupQuery(ns, 0, hs, 1, GROUPS)),
            "health": b.health,
        }.items():
            elapsed = _timed_failure(fn)
            assert 0.5 * timeout <= elapsed < 3 * timeout, (name, elapsed)
        b.close()
    finally:
        os.kill(pid, signal.SIGCONT)
        tp.kill()


def test_small_capacity_evicts_children_before_parents() -> None:
    cap = 3 << 20
    tp = TierProcess(capacity="3MiB").start()
    try:
        with _client(tp.url, timeout_s=10.0) as b:
            parents: dict[bytes, bytes | None] = {}
            requests = []
            for r in range(6):
                ns = _ns()
                hs = _hashes(12, seed=bytes([r]))
                items, p = _hybrid(ns, hs, {g: [3, 6, 9, 12] for g in STATES}, size=40_000)
                parents.update(p)
                requests.append((ns, hs))
                b.put_many(items)
                b.get_many([it.key for it in items[:2]])  # a partial hit refreshes a prefix
                entries = {e.key: e for e in b.scan()}
                for k in entries:
                    p_ = parents.get(k)
                    assert p_ is None or p_ in entries, f"{k!r} survived its parent"
                s = b.stats()
                assert s.bytes_used <= cap
                assert s.bytes_used == sum(e.size for e in entries.values())
            s = b.stats()
            assert s.evictions > 0
            assert s.capacity_bytes == cap
            assert s.bytes_used > cap // 2
            # the server's lookup agrees with one over exactly what survived
            alive = {e.key for e in b.scan()}
            for ns, hs in requests:
                q = LookupQuery(ns, 0, hs, 1, GROUPS)
                want = deepest_restorable(q, lambda ks: [k in alive for k in ks], True)
                assert _res(b.lookup(q, True)) == _res(want)
            # flush everything: the server is empty and still works
            assert b.flush() == len(alive)
            assert b.stats().entries == 0 and b.stats().bytes_used == 0
            assert b.put_many([_item(_ns(), ATTN, b"\x01" * 32, size=10)]) == 1
    finally:
        tp.stop()


# -- CLI and generated code --------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_cli_health_json(tier: TierProcess) -> None:
    r = _cli("health", "--url", tier.url, "--json")
    assert r.returncode == 0, r.stderr
    h = json.loads(r.stdout)
    assert h["ok"] is True
    assert h["backend"] == "memory"
    assert h["url"] == tier.url


def test_cli_health_dead_port() -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    r = _cli("health", "--url", url)
    assert r.returncode != 0
    r = _cli("health", "--url", url, "--json")
    assert r.returncode != 0
    h = json.loads(r.stdout)
    assert h["ok"] is False and h["url"] == url and h["error"]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools not installed")
def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    for name in ("tier_pb2.py", "tier_pb2_grpc.py"):
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "kvtier" / "proto" / name).read_text()
        assert fresh == committed, f"kvtier/proto/{name} is stale: run scripts/gen_proto.sh"
