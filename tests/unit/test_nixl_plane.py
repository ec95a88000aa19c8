"""The NIXL data plane between a real ``kvtier serve --nixl`` process and real NIXL agents
(UCX, no GPU) in this process: reads and writes, leases under eviction pressure, stale and
corrupted extents, a server killed mid-read, two readers at once, fallbacks, idle CPU."""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def test_stale_and_corrupted_extents_are_misses(tier) -> None:
    a, c = _items(2)
    with open_backend(tier.url, timeout_s=10) as b:
        b.put_many([a, c])
        b.get_many([a.key])  # connects the NIXL route
        path = b._nixl
        client, server = path._client, path._server
        deadline = time.monotonic() + 10
        # Stale: the lease ends, the entry is deleted and its space reused, then we read.
        r = client.locate(server, [a.key], deadline)
        client._release(r.lease_id, 0)
        b.delete_many([a.key])
        b.put_many(_items(4))
        out, nbytes = client.fetch(server, r.extents, deadline)
        assert out == [None] and nbytes == 0
        # Corrupted: flip payload bytes in the server's arena with a NIXL WRITE.
        r = client.locate(server, [c.key], deadline)
        e = r.extents[0]
        buf, addr = client._staging.get(16)
        buf[:16] = b"\xff" * 16
        import numpy as np

        client.agent.transfer("WRITE", client._remotes_name(server),
                              np.array([[addr, 16]], dtype=np.uint64),
                              np.array([[e.address + 100, 16]], dtype=np.uint64), 10)
        client._release(r.lease_id, 0)
        torn = client.torn
        assert b.get_many([c.key]) == [None]  # a miss, not an error
        assert client.torn == torn + 1


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
