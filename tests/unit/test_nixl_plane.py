"""The NIXL data plane between a real ``kvtier serve --nixl`` process and real NIXL agents
(UCX, no GPU) in this process: reads and writes, leases under eviction pressure, stale and
corrupted extents, a server killed mid-read, two readers at once, fallbacks, idle CPU."""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier import payload
from kvtier.backends import BackendError, open_backend
from kvtier.backends.base import PutItem
from kvtier.keys import BlockKey
from kvtier.proto import tier_pb2 as pb
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.transport import nixl

pytestmark = pytest.mark.skipif(not nixl.available(), reason="nixl not installed")
BLOCK = 64 << 10


def _items(n: int, size: int = BLOCK) -> list[PutItem]:
    ns = os.urandom(16)
    return [PutItem(BlockKey(ns, 0, 1, os.urandom(32)).encode(), os.urandom(size))
            for _ in range(n)]


def _bytes_metric(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "kvtier_bytes_total":
                out[(s.labels["direction"], s.labels["transport"])] = s.value
    return out


@pytest.fixture
def tier():
    mport = free_port()
    with TierProcess(capacity="64MiB", nixl=True,
                     extra_args=("--metrics-port", str(mport))) as t:
        t.metrics_port = mport  # type: ignore[attr-defined]
        yield t


def test_reads_and_writes_go_over_nixl_and_are_counted(tier) -> None:
    items = _items(32)
    with open_backend(tier.url, timeout_s=10) as b:
        assert b.health()["nixl_agent"]
        assert b.put_many(items) == 32
        got = b.get_many([it.key for it in items] + [_items(1)[0].key])
        assert [bytes(g) for g in got[:-1]] == [it.value for it in items] and got[-1] is None
        assert b.bytes_by_transport == {"nixl": 2 * 32 * BLOCK}
    m = _bytes_metric(tier.metrics_port)
    assert m[("out", "nixl")] == m[("in", "nixl")] == 32 * BLOCK
    assert m.get(("out", "tcp"), 0) == m.get(("out", "grpc"), 0) == 0


def test_lease_keeps_an_entry_under_eviction_pressure(tier) -> None:
    held = _items(1)[0]
    with open_backend(tier.url, timeout_s=10) as b:
        b.put_many([held])
        lease = b._stub.Locate(pb.LocateRequest(keys=[held.key], lease_s=30)).lease_id
        for _ in range(3):  # 3x the capacity, written after it: LRU would evict it first
            b.put_many(_items(1100))
        assert b.contains_many([held.key]) == [True]
        assert b._stub.Release(pb.ReleaseRequest(lease_id=lease)).released
        b.put_many(_items(1100))
        assert b.contains_many([held.key]) == [False]


def _poke(client, server: str, address: int, data: bytes) -> None:  # noqa: ANN001
    """Overwrite tier memory with a NIXL WRITE (what a rogue peer or a bug could do)."""
    buf, addr = client._staging.get(len(data))
    buf[:len(data)] = data
    client.agent.transfer("WRITE", client._remotes_name(server),
                          np.array([[addr, len(data)]], dtype=np.uint64),
                          np.array([[address, len(data)]], dtype=np.uint64), 10)


def test_stale_and_corrupted_extents_are_misses(tier) -> None:
    a, c, d = _items(3)
    key = BlockKey.decode(c.key)
    c = PutItem(c.key, payload.encode(key, b"L" * 8, os.urandom(BLOCK)))
    with open_backend(tier.url, timeout_s=10) as b:
        b.put_many([a, c, d])
        b.get_many([a.key])  # connects the NIXL route
        path = b._nixl
        client, server = path._client, path._server
        deadline = time.monotonic() + 10
        # Stale: the lease ends, the entry is deleted and its space reused, then we read.
        r = client.locate(server, [a.key], deadline)
        client._release(r.lease_id, 0)
        b.delete_many([a.key])
        b.put_many(_items(4))
        torn = client.torn
        out, nbytes = client.fetch(server, r, deadline)
        assert out == [None] and nbytes == 0 and client.torn == torn + 1
        # A changed generation word (an extent the server reused under a lost lease).
        r = client.locate(server, [d.key], deadline)
        _poke(client, server, r.address[0], b"\xff" * 8)
        client._release(r.lease_id, 0)
        assert b.get_many([d.key]) == [None]  # a miss, not an error
        assert client.torn == torn + 2
        # Corrupted payload bytes: NIXL hands them over, and the payload's own checksum
        # (what every consumer checks, whatever the transport) refuses them.
        assert payload.decode(b.get_many([c.key])[0], key) is not None
        r = client.locate(server, [c.key], deadline)
        _poke(client, server, r.address[0] + 100, b"\xff" * 16)
        client._release(r.lease_id, 0)
        got = b.get_many([c.key])[0]
        assert got is not None and len(got) == len(c.value)
        with pytest.raises(payload.PayloadError, match="checksum"):
            payload.decode(got, key)


def _leases(url: str) -> int:
    with open_backend(url, timeout_s=10, transport="grpc") as b:
        return b.stats().extra["leases"]


def test_a_read_keeps_order_and_ends_every_lease(tier) -> None:
    """Values come back in request order with misses in place, payloads a batch wrote back
    to back (one descriptor) and ones apart alike, and no lease outlives the read, also
    when the READ fails (its caller then reads over TCP)."""
    items = _items(120)
    with open_backend(tier.url, timeout_s=10) as b:
        for i in range(0, 120, 40):  # batches: back to back inside, apart across
            b.put_many(items[i:i + 40])
        keys = [it.key for it in items]
        keys[7:7] = [_items(1)[0].key]  # a miss among them
        keys.append(_items(1)[0].key)  # and at the end
        written = b.bytes_by_transport["nixl"]
        got = b.get_many(keys)
        want = [it.value for it in items]
        want[7:7] = [None]
        want.append(None)
        assert [None if g is None else bytes(g) for g in got] == want
        assert b.bytes_by_transport == {"nixl": written + 120 * BLOCK}
        client = b._nixl._client
        calls: list[int] = []

        def fails(*a, **kw) -> None:  # noqa: ANN002, ANN003
            calls.append(1)
            raise nixl.NixlError("injected: the READ failed")

        client.agent.transfer = fails
        got = b.get_many(keys)
        assert [None if g is None else bytes(g) for g in got] == want
        assert calls and b.bytes_by_transport["tcp"] == 120 * BLOCK  # read over TCP instead
    deadline = time.monotonic() + 10
    while _leases(tier.url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leases(tier.url) == 0


def test_read_into_places_each_payload_straight_into_its_slots(tier) -> None:
    """Heads come back from staging, the data lands in the given runs of registered local
    memory (two planes of a paged cache, random slots), and passes the payload checksum
    where it landed; a stale extent or a payload of another size is None."""
    half = 8 << 10
    planes = [np.zeros((64, half), dtype=np.uint8) for _ in range(2)]
    regions = [(p.ctypes.data, p.nbytes) for p in planes]
    ns, layout = os.urandom(16), b"L" * 8
    keys, items, datas = [], [], []
    for _ in range(80):
        k = BlockKey(ns, 0, 1, os.urandom(32))
        datas.append(os.urandom(2 * half))
        keys.append(k)
        items.append(PutItem(k.encode(), payload.encode(k, layout, datas[-1])))
    slots = np.random.default_rng(0).permutation(64)[:40].tolist() * 2  # two reads of 40
    places = [[(planes[0][s].ctypes.data, half), (planes[1][s].ctypes.data, half)]
              for s in slots]
    with open_backend(tier.url, timeout_s=10) as b:
        b.put_many(items)
        b.get_many([items[0].key])  # connects the NIXL route
        first, second = slice(0, 40), slice(40, 80)
        heads = b.read_into([it.key for it in items[first]], payload.HEADER_SIZE,
                            places[first], regions)
        assert heads is not None and all(h is not None for h in heads)
        for i, h in enumerate(heads):
            s_ = slots[i]
            payload.check_split(h, [memoryview(planes[0][s_]), memoryview(planes[1][s_])],
                                keys[i], layout)
            assert planes[0][s_].tobytes() + planes[1][s_].tobytes() == datas[i]
        # A stale extent (deleted, space reused) and a wrong-sized place: None, and only
        # those two; the others still land and check.
        client, server = b._nixl._client, b._nixl._server
        keys2 = [it.key for it in items[second]]
        r = client.locate(server, keys2, time.monotonic() + 10)
        client._release(r.lease_id, 0)
        b.delete_many([keys2[3]])
        b.put_many(_items(2, 2 * half + payload.HEADER_SIZE))
        odd = list(places[second])
        odd[5] = [(planes[0][slots[45]].ctypes.data, half)]  # half the payload's size
        heads = client._fetch_into(server, r, payload.HEADER_SIZE, odd,
                                   time.monotonic() + 10)[0]
        assert [i for i, h in enumerate(heads) if h is None] == [3, 5]
        s_ = slots[40]
        payload.check_split(heads[0], [memoryview(planes[0][s_]), memoryview(planes[1][s_])],
                            keys[40], layout)


def test_read_into_memory_that_cannot_take_it_is_a_fallback(tier) -> None:
    """Places NIXL cannot write (here: an unmapped address) fail the READ: read_into says
    None (the caller reads through staging), nothing crashes, and reads go on."""
    items = _items(4)
    with open_backend(tier.url, timeout_s=10) as b:
        b.put_many(items)
        keys = [it.key for it in items]
        places = [[(4096 * (i + 1), BLOCK)] for i in range(4)]
        assert b.read_into(keys, 0, places, [(4096, 4 * BLOCK)]) is None
        assert b._nixl.failures == 1
        assert [bytes(g) for g in b.get_many(keys)] == [it.value for it in items]


def test_bench_restore_paths_place_the_same_bytes(tier) -> None:
    """``kvtier bench nixl``'s restore comparison on a small prefix: both paths run on a
    real tier and the in-place one leaves every slot holding its payload's data (the bench
    checks it before timing anything)."""
    from kvtier.benches.nixl import _restore_bench

    ns = os.urandom(16)
    items = []
    for _ in range(16):
        k = BlockKey(ns, 0, 3, os.urandom(32))
        items.append(PutItem(k.encode(), payload.encode(k, b"L" * 8, os.urandom(2 * 8192))))
    with open_backend(tier.url, timeout_s=10) as b:
        b.put_many(items)
        staged, direct = _restore_bench(b, items, [it.key for it in items])
    assert staged > 0 and direct > 0


def test_two_readers_of_the_same_blocks_at_once(tier) -> None:
    items = _items(64)
    with open_backend(tier.url, timeout_s=10) as w:
        w.put_many(items)
    results: list = []

    def read() -> None:
        with open_backend(tier.url, timeout_s=10) as b:  # its own NIXL agent
            for _ in range(5):
                got = b.get_many([it.key for it in items])
                results.append(all(bytes(g) == it.value for g, it in zip(got, items)))
            results.append(dict(b.bytes_by_transport))

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(True) == 10
    assert [r for r in results if isinstance(r, dict)] == [{"nixl": 5 * 64 * BLOCK}] * 2


def test_server_killed_mid_read_gives_misses_or_errors_never_wrong_bytes() -> None:
    items = _items(256, 256 << 10)  # 64 MiB per read
    t = TierProcess(capacity="128MiB", nixl=True).start()
    try:
        with open_backend(t.url, timeout_s=3) as b:
            b.put_many(items)
            outcomes: list[str] = []

            def reader() -> None:
                for _ in range(40):
                    try:
                        got = b.get_many([it.key for it in items])
                    except BackendError:
                        outcomes.append("error")
                        continue
                    for g, it in zip(got, items):
                        assert g is None or bytes(g) == it.value
                    outcomes.append("hit" if all(g is not None for g in got) else "miss")

            th = threading.Thread(target=reader)
            th.start()
            time.sleep(1.0)
            t.kill()
            th.join(120)
            assert not th.is_alive()
        assert "hit" in outcomes and outcomes[-1] == "error", outcomes
    finally:
        t.kill()


def test_fallbacks_tier_without_nixl_and_client_on_tcp(tier) -> None:
    items = _items(8)
    with TierProcess(capacity="64MiB", nixl=False) as plain, \
            open_backend(plain.url, timeout_s=10) as b:
        assert not b.health()["nixl_agent"]
        b.put_many(items)
        assert [bytes(g) for g in b.get_many([it.key for it in items])] == [
            it.value for it in items]
        assert b.bytes_by_transport == {"grpc": 8 * BLOCK, "tcp": 8 * BLOCK}
    with open_backend(tier.url, timeout_s=10, transport="tcp") as b:
        b.put_many(items)
        assert [bytes(g) for g in b.get_many([it.key for it in items])] == [
            it.value for it in items]
        assert b.bytes_by_transport == {"grpc": 8 * BLOCK, "tcp": 8 * BLOCK}


def test_idle_cpu_of_a_server_with_nixl_is_near_zero(tier) -> None:
    with open_backend(tier.url, timeout_s=10) as b:
        items = _items(64)
        b.put_many(items)
        for _ in range(5):
            b.get_many([it.key for it in items])
        assert b.bytes_by_transport["nixl"] > 0
        proc = psutil.Process(tier.proc.pid)
        time.sleep(1.5)  # the pump's window after the last lease
        c0, t0 = proc.cpu_times(), time.monotonic()
        time.sleep(4)
        c1, t1 = proc.cpu_times(), time.monotonic()
        share = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)
        me = psutil.Process()
        m0 = me.cpu_times()
        time.sleep(2)
        m1 = me.cpu_times()
        mine = (m1.user + m1.system - m0.user - m0.system) / 2
    print(f"idle CPU with NIXL on: server {share:.2%} of a core, client process {mine:.2%}")
    assert share < 0.02 and mine < 0.02  # the goal; a spinning pump measured 5%


def test_a_restarted_tier_is_read_over_tcp_then_nixl_again() -> None:
    """The client knows the old server agent; the new one answers Locate: that read goes
    over the bulk port within the same call, and NIXL resumes after the retry interval."""
    items = _items(16)
    t = TierProcess(capacity="64MiB", nixl=True).start()
    try:
        with open_backend(t.url, timeout_s=10, bulk_retry_s=0.5) as b:
            b.put_many(items)
            b.get_many([it.key for it in items])
            assert b.bytes_by_transport["nixl"] == 2 * 16 * BLOCK
            t.stop()
            t.start()
            with open_backend(t.url, timeout_s=10, transport="grpc") as w:
                w.put_many(items)
            got = b.get_many([it.key for it in items])
            assert [bytes(g) for g in got] == [it.value for it in items]
            assert b.bytes_by_transport["tcp"] == 16 * BLOCK
            assert b._nixl.failures >= 1
            time.sleep(0.6)
            got = b.get_many([it.key for it in items])
            assert [bytes(g) for g in got] == [it.value for it in items]
            assert b.bytes_by_transport["nixl"] == 3 * 16 * BLOCK
    finally:
        t.kill()
