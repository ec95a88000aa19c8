"""RedisBackend against real redis-server processes: standalone, cluster, ACL and TLS."""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import pytest
import redis

from kvtier import payload
from kvtier.backends import open_backend
from kvtier.backends.base import BackendError, PutItem
from kvtier.backends.memory import MemoryBackend
from kvtier.backends.redis import RedisBackend, parse_redis_url
from kvtier.keys import BlockKey, Namespace, fingerprint, namespace_prefix
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery, StopReason
from kvtier.testing.redis_servers import KVTIER_USER, redis_cluster
from tests.helpers import bad_entries

pytestmark = pytest.mark.redis

PAGE = 196_608  # one block of one group in the tiny Qwen3-Next layout (design note, section 4)
LAYOUT = payload.layout_digest("qwen3next-tiny bf16 page=196608 block=384")
# Qwen3-Next: three GDN (state) groups and one full-attention group, one block per boundary.
GROUPS = [GroupQuery(g, GroupKind.STATE) for g in range(3)] + [
    GroupQuery(3, GroupKind.ATTENTION)
]


def _namespace() -> bytes:
    return Namespace("tiny-qwen3next", fingerprint({"page": PAGE}), uuid.uuid4().hex).id


def _hashes(n: int) -> list[bytes]:
    out, h = [], b"root"
    for i in range(n):
        h = hashlib.sha256(h + i.to_bytes(4, "little")).digest()
        out.append(h)
    return out


def _query(ns: bytes, hashes: list[bytes], **kw: object) -> LookupQuery:
    return LookupQuery(ns, 0, hashes, 1, GROUPS, **kw)


def _item(ns: bytes, group: int, h: bytes, parent: bytes | None = None, size: int = PAGE):
    key = BlockKey(ns, 0, group, h)
    data = os.urandom(size)
    return PutItem(key.encode(), payload.encode(key, LAYOUT, data), parent)


def _hybrid_prefix(ns: bytes, hashes: list[bytes], state_at: dict[int, list[int]]):
    """Attention blocks for every hash, plus states (per group) at the given 1-based boundaries."""
    items, parent = [], None
    for h in hashes:
        it = _item(ns, 3, h, parent)
        items.append(it)
        parent = it.key
    for g, boundaries in state_at.items():
        for b in boundaries:
            items.append(_item(ns, g, hashes[b - 1], BlockKey(ns, 0, 3, hashes[b - 1]).encode()))
    return items


@pytest.fixture
def backend(redis_target):
    b = redis_target.backend(timeout_s=5)
    yield b
    b.close()


# -- data path ------------------------------------------------------------------------------


def test_roundtrip_realistic_payloads(redis_target, backend):
    ns = _namespace()
    hashes = _hashes(6)
    items = _hybrid_prefix(ns, hashes, {0: [3, 6], 1: [3, 6], 2: [3, 6]})
    assert backend.put_many(items) == len(items)
    missing = BlockKey(ns, 0, 3, b"\x01" * 32).encode()
    got = backend.get_many([missing, *(it.key for it in items), missing])
    assert got[0] is None and got[-1] is None
    for it, value in zip(items, got[1:-1], strict=True):
        assert value == it.value  # bytes-exact
        key = BlockKey.decode(it.key)
        data = payload.decode(value, expected_key=key, expected_layout=LAYOUT)
        assert data.nbytes == PAGE
    assert backend.get_many([]) == []
    # Same key again: counted as stored, nothing rewritten.
    assert backend.put_many(items[:2]) == 2
    st = backend.stats()
    assert st.hits == len(items) and st.misses == 2
    assert st.extra["parser"] == "hiredis"
    assert st.extra["nodes"] == (3 if redis_target.kind.startswith("cluster") else 1)


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_save_over_a_bad_entry_replaces_it(request, kind):
    """Every bad kind stored behind the tier's back (admin SET) gives way to a sound
    save; a bad save never displaces a sound entry; re-saving the same is no write."""
    target = request.getfixturevalue(f"redis_{kind}_target")
    b = target.backend(timeout_s=5)
    try:
        for bad_kind in bad_entries.BAD_KINDS:
            key = bad_entries.block_key(tag=bad_kind)
            k = key.encode()
            target.admin.set(k, bad_entries.bad(bad_kind, key))
            fresh = bad_entries.good(key)
            before = b.stats().extra["replaced"]
            assert b.put_many([PutItem(k, fresh)]) == 1
            assert b.get_many([k]) == [fresh], bad_kind
            assert b.stats().extra["replaced"] == before + 1
            for again, stored in ((fresh, 1), (bad_entries.bad("corrupt", key), 0),
                                  (bad_entries.good(key), 1)):
                assert b.put_many([PutItem(k, again)]) == stored  # the bad one refused
                assert b.get_many([k]) == [fresh], bad_kind
            assert b.stats().extra["replaced"] == before + 1
    finally:
        b.close()


def test_replacing_keeps_pins_and_expiry(redis_standalone_target):
    """SET XX KEEPTTL: a pinned (persistent) bad key stays pinned, an unpinned one keeps
    its TTL."""
    t = redis_standalone_target
    b = t.backend(timeout_s=5, ttl_s=600)
    try:
        pinned, loose = bad_entries.block_key(tag="pinned"), bad_entries.block_key(tag="loose")
        t.admin.set(pinned.encode(), bad_entries.bad("corrupt", pinned))
        t.admin.set(loose.encode(), bad_entries.bad("corrupt", loose), ex=600)
        goods = {k: bad_entries.good(k) for k in (pinned, loose)}
        assert b.put_many([PutItem(k.encode(), v) for k, v in goods.items()]) == 2
        assert b.get_many([pinned.encode(), loose.encode()]) == list(goods.values())
        assert t.admin.ttl(pinned.encode()) == -1
        assert 0 < t.admin.ttl(loose.encode()) <= 600
    finally:
        b.close()


def test_lookup_deepest_restorable_matches_memory_backend(backend):
    ns = _namespace()
    hashes = _hashes(9)
    # States at 3 and 6 for every GDN group; at 8 one group lacks its state.
    items = _hybrid_prefix(ns, hashes, {0: [3, 6, 8], 1: [3, 6, 8], 2: [3, 6]})
    backend.put_many(items)
    mem = MemoryBackend()
    mem.put_many(items)
    q = _query(ns, hashes)
    r = backend.lookup(q, with_details=True)
    assert r.boundary == 6
    assert r.reason is StopReason.MISSING_STATE
    assert r == mem.lookup(q, with_details=True)
    assert backend.lookup(_query(ns, hashes, max_boundary=5)).boundary == 3
    assert backend.lookup(_query(ns, hashes, start_boundary=6)).boundary == 6
    assert backend.lookup(_query(_namespace(), hashes)).boundary == 0


def test_parent_deleted_behind_the_tiers_back_caps_the_hit(redis_target, backend):
    ns = _namespace()
    hashes = _hashes(8)
    items = _hybrid_prefix(ns, hashes, {g: [2, 4, 6, 8] for g in range(3)})
    backend.put_many(items)
    assert backend.lookup(_query(ns, hashes)).boundary == 8
    # Redis evicts attention block 5 (boundary 5's block) on its own: later states survive.
    assert redis_target.admin.delete(BlockKey(ns, 0, 3, hashes[4]).encode()) == 1
    r = backend.lookup(_query(ns, hashes))
    assert r.boundary == 4
    assert r.reason is StopReason.MISSING_ATTENTION
    # A state deleted behind our back drops that boundary only.
    redis_target.admin.delete(BlockKey(ns, 0, 1, hashes[3]).encode())
    assert backend.lookup(_query(ns, hashes)).boundary == 2


def test_scan_and_flush_touch_only_kvtier_keys(redis_target, backend):
    ns, other = _namespace(), _namespace()
    mine = [_item(ns, 3, h, size=100) for h in _hashes(5)]
    theirs = [_item(other, 3, h, size=100) for h in _hashes(3)]
    backend.put_many(mine + theirs)
    foreign = b"app:session:42"
    look_alike = b"kvt1x"  # shares the first bytes, outside the kvt1: key space
    redis_target.admin.set(foreign, b"keep me")
    redis_target.admin.set(look_alike, b"keep me too")
    try:
        entries = list(backend.scan(namespace_prefix(ns)))
        assert sorted(e.key for e in entries) == sorted(it.key for it in mine)
        assert all(e.size == len(mine[0].value) for e in entries)
        assert len(list(backend.scan(namespace_prefix(ns), limit=2))) == 2
        assert list(backend.scan(b"app:")) == []  # outside kvtier's key space: nothing
        assert backend.flush(b"app:") == 0
        assert backend.flush(namespace_prefix(ns)) == len(mine)
        assert backend.contains_many([it.key for it in mine]) == [False] * len(mine)
        assert all(backend.contains_many([it.key for it in theirs]))
        backend.flush()  # everything of kvtier's, nothing else
        assert not any(backend.contains_many([it.key for it in theirs]))
        assert list(backend.scan()) == []
        assert redis_target.admin.get(foreign) == b"keep me"
        assert redis_target.admin.get(look_alike) == b"keep me too"
    finally:
        redis_target.admin.delete(foreign)
        redis_target.admin.delete(look_alike)


def test_delete_many_and_contains(backend):
    ns = _namespace()
    items = [_item(ns, 3, h, size=64) for h in _hashes(10)]
    backend.put_many(items)
    keys = [it.key for it in items]
    assert backend.delete_many(keys[:4] + [b"kvt1:none"]) == 4
    assert backend.contains_many(keys) == [False] * 4 + [True] * 6
    assert backend.delete_many([]) == 0 and backend.contains_many([]) == []


def test_ttl_applied_and_pin_removes_it(redis_target):
    b = redis_target.backend(ttl_s=300)
    try:
        ns = _namespace()
        items = [_item(ns, 3, h, size=64) for h in _hashes(4)]
        keys = [it.key for it in items]
        assert b.put_many(items) == 4
        admin = redis_target.admin
        assert all(290 <= admin.ttl(k) <= 300 for k in keys)
        assert b.pin(keys[:2] + [b"kvt1:none"]) == 2
        assert [admin.ttl(k) for k in keys[:2]] == [-1, -1]
        # Putting a pinned block again must not give it an expiry back.
        assert b.put_many(items[:2]) == 2
        assert [admin.ttl(k) for k in keys[:2]] == [-1, -1]
        pinned = {e.key for e in b.scan(namespace_prefix(ns)) if e.pinned}
        assert pinned == set(keys[:2])
        assert b.pin(keys[:1], pinned=False) == 1
        assert 290 <= admin.ttl(keys[0]) <= 300
        # A re-put refreshes an unpinned block's TTL.
        admin.expire(keys[3], 10)
        b.put_many(items[3:])
        assert admin.ttl(keys[3]) > 200
    finally:
        b.close()


def test_no_ttl_by_default_and_url_ttl(redis_target, backend):
    ns = _namespace()
    it = _item(ns, 3, _hashes(1)[0], size=10)
    backend.put_many([it])
    assert redis_target.admin.ttl(it.key) == -1
    sep = "&" if "?" in redis_target.url else "?"
    with RedisBackend(redis_target.url + f"{sep}ttl_s=120") as b:
        it2 = _item(ns, 3, b"\x02" * 32, size=10)
        b.put_many([it2])
        assert 100 < redis_target.admin.ttl(it2.key) <= 120


def test_stats_and_health(redis_target, backend):
    ns = _namespace()
    backend.put_many([_item(ns, 3, h, size=1000) for h in _hashes(3)])
    st = backend.stats()
    assert st.backend == "redis"
    assert st.entries >= 3 and st.bytes_used > 0 and st.puts == 3
    cluster = redis_target.kind.startswith("cluster")
    assert st.extra["mode"] == ("cluster" if cluster else "standalone")
    h = backend.health()
    assert h["ok"] is True and h["nodes"] == st.extra["nodes"]
    assert "password" not in repr(backend) and KVTIER_USER.password not in str(st.as_dict())


def test_open_backend_factory(redis_target):
    with open_backend(redis_target.url, timeout_s=3) as b:
        assert isinstance(b, RedisBackend)
        assert b.health()["ok"]


# -- cluster --------------------------------------------------------------------------------


def test_cluster_keys_spread_over_nodes_and_batched_per_node(redis_cluster_target, monkeypatch):
    t = redis_cluster_target
    ns = _namespace()
    items = [_item(ns, 3, h, size=4096) for h in _hashes(60)]
    with t.backend() as b:
        assert b.put_many(items) == 60
        per_node = []
        for n in t.server.nodes:
            with n.client() as c:
                per_node.append(len(list(c.scan_iter(match=namespace_prefix(ns) + b"*"))))
        assert sum(per_node) == 60
        assert sum(1 for n in per_node if n > 0) == 3  # really spread over all masters

        batches: list[tuple[int, int]] = []  # (port, commands) per pipelined write
        real = redis.connection.Connection.pack_commands

        def counting(self, commands):
            commands = list(commands)
            batches.append((self.port, len(commands)))
            return real(self, commands)

        monkeypatch.setattr(redis.connection.Connection, "pack_commands", counting)
        keys = [it.key for it in items]
        got = b.get_many(keys[::-1])
        assert got == [it.value for it in items][::-1]
        # One pipelined batch per node (not one per key or slot), one MGET per slot.
        assert sorted(p for p, _ in batches) == sorted(n.port for n in t.server.nodes)
        assert sum(n for _, n in batches) == len({redis.crc.key_slot(k) for k in keys})
        batches.clear()
        assert all(b.contains_many(keys))
        assert len(batches) == 3 and sum(n for _, n in batches) == len(keys)


def test_cluster_same_slot_keys_share_one_mget(redis_cluster_target):
    # Hash tags force one slot; kvtier keys never carry them, but other writers might.
    with redis_cluster_target.backend() as b:
        keys = [f"kvt1:{{tag}}:{i}".encode() for i in range(20)]
        b.put_many([PutItem(k, k * 3) for k in keys])
        assert b.get_many(keys) == [k * 3 for k in keys]
        assert b.delete_many(keys) == 20


def test_cluster_node_killed_fails_fast(redis_base):
    with redis_cluster(redis_base) as cl, RedisBackend(cl.url(), timeout_s=1.0) as b:
        ns = _namespace()
        items = [_item(ns, 3, h, size=64) for h in _hashes(30)]
        keys = [it.key for it in items]
        b.put_many(items)
        cl.nodes[2].pause()  # hung master: its batch times out, the call does not hang
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="timeout_s=1.0"):
            b.get_many(keys)
        assert time.monotonic() - t0 < 2
        cl.nodes[2].resume()
        assert b.get_many(keys) == [it.value for it in items]  # recovered (topology re-read)
        cl.nodes[1].stop()
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="redis get at redis\\+cluster://"):
            b.get_many(keys)
        assert time.monotonic() - t0 < 1.5  # refused at once: no retry storm, no hang
        # The next call re-reads the topology from the surviving seeds and still fails clearly
        # (slots of the dead master are uncovered), again without hanging.
        t0 = time.monotonic()
        with pytest.raises(BackendError):
            b.get_many(keys)
        assert time.monotonic() - t0 < 5


def _key_in_slot_of(admin_nodes, ns: bytes, not_on: int) -> tuple[bytes, int, int]:
    """A fresh kvtier key, the index of the master owning its slot, and its slot."""
    for i in range(10_000):
        key = BlockKey(ns, 0, 3, hashlib.sha256(b"%d" % i).digest()).encode()
        slot = redis.crc.key_slot(key)
        for idx, c in enumerate(admin_nodes):
            if idx != not_on and c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
                owner = c.execute_command("CLUSTER", "NODES")
                text = owner.decode() if isinstance(owner, bytes) else str(owner)
                for line in text.splitlines():
                    if "myself" in line:
                        ranges = line.split()[8:]
                        for r in ranges:
                            lo, _, hi = r.partition("-")
                            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                                return key, idx, slot
    raise AssertionError("no key found")


def test_cluster_follows_moved_and_ask_after_resharding(redis_base):
    with redis_cluster(redis_base) as cl, RedisBackend(cl.url(), timeout_s=2) as b:
        admins = cl.node_clients()
        ids = [c.execute_command("CLUSTER", "MYID") for c in admins]
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        ns = _namespace()
        b.health()  # the backend has read the slot map now; we change it behind its back
        slow: list[int] = []
        real_redirected = b._redirected
        b._redirected = lambda cmds: slow.append(len(cmds)) or real_redirected(cmds)

        # MOVED: an empty slot handed from its owner to another master.
        key, src, slot = _key_in_slot_of(admins, ns, not_on=-1)
        dst = (src + 1) % 3
        admins[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        admins[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        for c in admins:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
        item = PutItem(key, b"moved-value")
        assert b.put_many([item]) == 1
        assert slow == [1]  # MOVED took the slow path once and refreshed the slot map
        assert admins[dst].get(key) == b"moved-value"
        assert b.get_many([key]) == [b"moved-value"]
        assert b.contains_many([key]) == [True]

        # ASK: a slot half-way through a migration; the key already lives on the target.
        key2, src2, slot2 = _key_in_slot_of(admins, ns, not_on=-1)
        dst2 = (src2 + 1) % 3
        admins[dst2].execute_command("CLUSTER", "SETSLOT", slot2, "IMPORTING", ids[src2])
        admins[src2].execute_command("CLUSTER", "SETSLOT", slot2, "MIGRATING", ids[dst2])
        with cl.client() as admin:
            admin.set(key2, b"asked-value")  # redis-py follows ASK to the importing node
        pipe = admins[dst2].pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.get(key2)
        assert pipe.execute()[1] == b"asked-value"  # on the importing node, not the source
        assert b.get_many([key, key2]) == [b"moved-value", b"asked-value"]
        assert slow == [1, 1]  # only the ASKed key went the slow way
        assert b.contains_many([key2]) == [True]
        for c in admins:
            c.close()


# -- failures -------------------------------------------------------------------------------


def test_restart_empty_lookup_zero_then_reconnects(redis_private):
    with RedisBackend(redis_private.url(), timeout_s=2) as b:
        ns = _namespace()
        hashes = _hashes(4)
        items = _hybrid_prefix(ns, hashes, {g: [2, 4] for g in range(3)})
        b.put_many(items)
        assert b.lookup(_query(ns, hashes)).boundary == 4
        redis_private.restart()  # same port, empty (no persistence)
        assert b.lookup(_query(ns, hashes)).boundary == 0
        assert b.get_many([it.key for it in items]) == [None] * len(items)
        assert b.put_many(items) == len(items)  # reconnected and writing again
        assert b.lookup(_query(ns, hashes)).boundary == 4


def test_killed_server_raises_backend_error_quickly(redis_private):
    with RedisBackend(redis_private.url(), timeout_s=1.0) as b:
        assert b.health()["ok"]
        redis_private.stop()
        for call in (
            lambda: b.get_many([b"kvt1:x"]),
            lambda: b.put_many([PutItem(b"kvt1:x", b"v")]),
            lambda: b.lookup(_query(_namespace(), _hashes(2))),
            b.health,
            b.stats,
        ):
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="refused|cannot talk") as ei:
                call()
            assert time.monotonic() - t0 < 1.5
            assert not isinstance(ei.value, redis.RedisError)


def test_hung_server_times_out_instead_of_hanging(redis_private):
    with RedisBackend(redis_private.url(), timeout_s=0.5) as b:
        b.put_many([PutItem(b"kvt1:k", b"v")])
        redis_private.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="timeout_s=0.5"):
                b.get_many([b"kvt1:k"])
            assert time.monotonic() - t0 < 1.5
        finally:
            redis_private.resume()
        assert b.get_many([b"kvt1:k"]) == [b"v"]  # usable again once the server answers


def test_nothing_listening_at_construction_is_lazy(redis_base):
    from kvtier.testing.redis_servers import free_port

    b = RedisBackend(f"redis://127.0.0.1:{free_port()}", timeout_s=0.5)  # no I/O yet
    with pytest.raises(BackendError, match="is redis-server running"):
        b.health()
    b2 = RedisBackend(f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.5)
    with pytest.raises(BackendError):
        b2.get_many([b"kvt1:x"])


def test_memory_full_rejects_instead_of_raising(redis_base):
    from kvtier.testing.redis_servers import redis_standalone

    conf = ["maxmemory 3mb", "maxmemory-policy noeviction"]
    with redis_standalone(redis_base, extra_conf=conf) as s, RedisBackend(s.url()) as b:
        ns = _namespace()
        items = [_item(ns, 3, h) for h in _hashes(40)]  # ~8 MB > 3 MB
        stored = b.put_many(items)
        assert 0 < stored < 40
        st = b.stats()
        assert st.extra["rejected"] == 40 - stored
        assert st.capacity_bytes == 3 << 20


# -- ACL and TLS ----------------------------------------------------------------------------


def test_acl_wrong_password_is_a_clear_backend_error(redis_acl_target):
    url = redis_acl_target.url.replace("s3cret", "wrong", 1)
    assert url != redis_acl_target.url
    with RedisBackend(url) as b, pytest.raises(BackendError) as ei:
        b.get_many([b"kvt1:x"])
    msg = str(ei.value)
    assert "authentication failed for user 'kvtier'" in msg and "password" in msg
    assert "wrong" not in msg  # never echo the secret


def test_acl_missing_password_and_least_privilege(redis_acl_target):
    bare = redis_acl_target.url.split("@", 1)[1]
    with RedisBackend("redis://" + bare) as b, pytest.raises(BackendError, match="password"):
        b.get_many([b"kvt1:x"])
    # The kvtier user may only touch kvt1:* keys: a foreign key is a permission error.
    with RedisBackend(redis_acl_target.url) as b, pytest.raises(BackendError, match="ACL user"):
        b.get_many([b"app:foreign"])


def test_acl_user_without_cluster_slots_gets_an_acl_message(redis_cluster_tls_acl_target):
    t = redis_cluster_tls_acl_target
    for n in t.server.nodes:  # ACLs are per node
        with n.client() as c:
            c.execute_command("ACL", "SETUSER", "weak", "on", ">weak-pw", "~kvt1:*", "+@read")
    url = t.url.replace(t.url.split("://", 1)[1].split("@", 1)[0], "weak:weak-pw", 1)
    with RedisBackend(url) as b, pytest.raises(BackendError) as ei:
        b.get_many([b"kvt1:x"])
    # redis-py reports this as "Cluster mode is not enabled"; we name the real cause.
    assert "ACL user 'weak' lacks a permission" in str(ei.value)
    assert "+cluster|slots" in str(ei.value)


def test_tls_needs_the_ca_and_client_cert(redis_tls_target):
    srv = redis_tls_target.server
    with RedisBackend(srv.url()) as b:
        assert b.health()["ok"]
    with RedisBackend(srv.url(ca=False)) as b, pytest.raises(BackendError, match="ssl_ca_certs"):
        b.get_many([b"kvt1:x"])
    other_ca = srv.url().replace(str(srv.tls.ca_cert), str(srv.tls.other_ca_cert))
    with RedisBackend(other_ca) as b, pytest.raises(BackendError, match="not trusted"):
        b.get_many([b"kvt1:x"])
    with RedisBackend(srv.url(client_cert=False)) as b, pytest.raises(
        BackendError, match="ssl_certfile"
    ):
        b.get_many([b"kvt1:x"])
    plain = f"redis://{srv.address}"
    with RedisBackend(plain, timeout_s=1) as b, pytest.raises(BackendError, match="rediss://"):
        b.get_many([b"kvt1:x"])
    # Options as keywords work as well as in the url query.
    tls = srv.tls
    with RedisBackend(
        f"rediss://{srv.address}",
        ssl_ca_certs=str(tls.ca_cert),
        ssl_certfile=str(tls.client_cert),
        ssl_keyfile=str(tls.client_key),
    ) as b:
        assert b.health()["ok"]


def test_wrong_mode_urls_say_what_to_use(redis_standalone_target, redis_cluster_target):
    s = redis_standalone_target.server
    with RedisBackend(f"redis+cluster://{s.address}", timeout_s=2) as b, pytest.raises(
        BackendError, match="redis://"
    ):
        b.get_many([b"kvt1:x"])
    node = redis_cluster_target.server.nodes[0]
    keys = [f"kvt1:k{i}".encode() for i in range(30)]  # some hash to another node
    with RedisBackend(f"redis://{node.address}", timeout_s=2) as b, pytest.raises(
        BackendError, match="redis\\+cluster://"
    ):
        b.get_many(keys)


# -- URL validation (no server needed) -----------------------------------------------------


def test_url_parsing():
    t = parse_redis_url("redis://us%40er:p%3Aw%2F@10.0.0.1:7000/3?timeout_s=1.5&ttl_s=60")
    assert (t.username, t.password, t.nodes, t.db) == ("us@er", "p:w/", [("10.0.0.1", 7000)], 3)
    assert t.timeout_s == 1.5 and t.ttl_s == 60 and not t.tls and not t.cluster
    assert "p:w/" not in repr(t) and "p:w/" not in t.where
    t = parse_redis_url("rediss+cluster://:pw@h1:1,h2,[::1]:3?ssl_cert_reqs=none")
    assert t.cluster and t.tls and t.password == "pw" and t.username is None
    assert t.nodes == [("h1", 1), ("h2", 6379), ("::1", 3)]
    assert t.ssl == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert parse_redis_url("redis://h", ttl_s=0, timeout_s=9).ttl_s is None
    assert parse_redis_url("redis://h?timeout_s=1", timeout_s=4).timeout_s == 4  # keyword wins


@pytest.mark.parametrize(
    ("url", "kw", "fix"),
    [
        ("http://h:1", {}, "must start with one of"),
        ("redis://", {}, "names no host"),
        ("redis://h1:1,h2:2", {}, "redis\\+cluster://"),
        ("redis+cluster://h1:1/2", {}, "only has database 0"),
        ("redis://h:1/x", {}, "database number"),
        ("redis://h:99999", {}, "out of range"),
        ("redis://h:1?ssl_ca_certs=/x", {}, "rediss://"),
        ("rediss://h:1?ssl_ca_certs=/nonexistent/ca.pem", {}, "does not exist"),
        ("redis://h:1?capacity=4GiB", {}, "unknown redis option"),
        ("redis://h:1", {"timeout_s": -1}, "timeout_s must be > 0"),
        ("redis://h:1?db=2", {}, "as a path"),
        ("rediss://h:1?ssl_cert_reqs=maybe", {}, "required, optional or none"),
        ("redis://h:1?socket_keepalive=perhaps", {}, "boolean"),
    ],
)
def test_bad_urls_say_what_to_fix(url, kw, fix):
    with pytest.raises(ValueError, match=fix):
        RedisBackend(url, **kw)


# -- benchmark (smoke) ----------------------------------------------------------------------


def test_bench_runs_against_a_given_url(redis_target):
    from kvtier.benches.redis import run_redis_bench

    out = run_redis_bench(redis_target.url, total_bytes=2 << 20, rounds=2)
    (r,) = out["results"]
    assert r["payloads"] >= 8 and r["tier_get_gbs"] > 0 and r["raw_get_gbs"] > 0
    assert r["lookup_boundary"] == r["payloads"] // 4  # every boundary restorable
    assert r["mode"] == ("cluster" if redis_target.kind.startswith("cluster") else "standalone")
    with redis_target.backend() as b:  # the benchmark cleans up after itself
        assert list(b.scan(namespace_prefix(bytes.fromhex(r["namespace"])))) == []


# -- eviction by value through expiry tiers ----------------------------------------------

def _session(ns: bytes, name: str, size: int) -> tuple[list[PutItem], list[bytes]]:
    """One save: attention blocks 1..8, a state at 1 (superseded by the one at 3), a state
    at 3, and blocks 4..8 as a tail with no state after them."""
    hashes = _hashes(8)
    hashes = [hashlib.sha256(name.encode() + h).digest() for h in hashes]
    items, parent = [], None
    for h in hashes:
        items.append(_item(ns, 3, h, parent, size))
        parent = items[-1].key
    for b in (1, 3):
        items.append(_item(ns, 0, hashes[b - 1], BlockKey(ns, 0, 3, hashes[b - 1]).encode(),
                           3 * size))
    return items, hashes


def test_ttl_tiers_of_one_save() -> None:
    from kvtier.backends.redis import ttl_tiers

    items, _ = _session(_namespace(), "s", 10)
    assert ttl_tiers(items) == ["prefix"] * 3 + ["tail"] * 5 + ["mid_state", "state"]
    assert ttl_tiers(items[:8]) == ["tail"] * 8  # no state: nothing to keep a prefix for


def test_ttl_tiers_keep_restorable_states_under_volatile_ttl(redis_base) -> None:
    """Redis under memory pressure with volatile-ttl evicts the key nearest expiry: with
    tiers that is tails and superseded states, so more sessions stay restorable than
    with one expiry for all, where whole old sessions go and new tails stay."""
    from kvtier.testing.redis_servers import redis_standalone

    conf = ["maxmemory 8mb", "maxmemory-policy volatile-ttl", "maxmemory-samples 10"]
    groups = [GroupQuery(0, GroupKind.STATE), GroupQuery(3, GroupKind.ATTENTION)]
    restorable, tails_left = {}, {}
    for tiers in (False, True):
        with redis_standalone(redis_base, extra_conf=conf) as s, \
                RedisBackend(s.url(), ttl_s=3600, ttl_tiers=tiers) as b:
            ns = _namespace()
            sessions = [_session(ns, f"s{i}", 40_000) for i in range(30)]  # ~18 MB
            for items, _ in sessions:
                b.put_many(items)
            assert b.stats().evictions > 0 and b.stats().extra["ttl_tiers"] is tiers
            restorable[tiers] = sum(b.lookup(LookupQuery(ns, 0, h, 1, groups)).boundary == 3
                                    for _, h in sessions)
            tails_left[tiers] = sum(b.contains_many([it.key for it in items[3:8]]).count(True)
                                    for items, _ in sessions)
    assert restorable[True] >= restorable[False] + 4, restorable
    assert tails_left[True] < tails_left[False], tails_left


def test_ttl_tiers_needs_a_ttl_and_reads_refresh(redis_standalone_target) -> None:
    url = redis_standalone_target.url
    with pytest.raises(ValueError, match="ttl_tiers needs ttl_s"):
        parse_redis_url(url + "?ttl_tiers=true")
    ns = _namespace()
    items, _ = _session(ns, "r", 100)
    with RedisBackend(url, ttl_s=100, ttl_tiers=True) as b:
        b.put_many(items)
        raw = redis.Redis.from_url(url)
        ttls = [raw.ttl(it.key) for it in items]
        assert ttls[:3] == [200] * 3 and ttls[3:8] == [25] * 5 and ttls[8:] == [50, 100]
        b.get_many([items[5].key])  # a restored key goes to the top tier
        assert raw.ttl(items[5].key) == 200 and raw.ttl(items[4].key) == 25
