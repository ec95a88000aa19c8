"""Warm restart: a snapshot gives back exactly the store it was taken of, or nothing.

File-level tests on the snapshot module, then a real ``kvtier serve`` process
stopped with SIGTERM (and killed with SIGKILL after a periodic snapshot) and
restarted on the same directory.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from kvtier import payload
from kvtier.backends import snapshot as snap
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.backends.memory import MemoryBackend
from kvtier.keys import BlockKey, manifest_key
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery
from kvtier.testing.waits import wait_until
from tests.helpers.servers import TierProcess, server_log

NS = hashlib.sha256(b"snapshot-test").digest()[:16]
LAYOUT = payload.layout_digest("snapshot test layout")
HASHES = [hashlib.sha256(b"h%d" % i).digest() for i in range(8)]
GROUPS = [GroupQuery(0, GroupKind.ATTENTION, 1), GroupQuery(1, GroupKind.STATE, 1)]


def _items(size: int = 3000) -> list[PutItem]:
    """A real prefix: attention blocks chained by parent, a state on each block."""
    items, parent = [], None
    for i, h in enumerate(HASHES):
        for g in (0, 1):
            k = BlockKey(NS, 0, g, h)
            v = payload.encode(k, LAYOUT, os.urandom(size + i))
            on = BlockKey(NS, 0, 0, h).encode()  # a state sits on its attention block
            items.append(PutItem(k.encode(), v, parent if g == 0 else on))
        parent = BlockKey(NS, 0, 0, h).encode()
    items.append(PutItem(manifest_key(NS), b'{"model": "snapshot-test"}'))
    return items


def _query() -> LookupQuery:
    return LookupQuery(NS, 0, HASHES, 1, GROUPS)


def _store() -> tuple[MemoryBackend, list[PutItem]]:
    m = MemoryBackend(1 << 24)
    items = _items()
    assert m.put_many(items) == len(items)
    m.pin([items[0].key])
    return m, items


def _contents(b) -> dict[bytes, tuple]:  # noqa: ANN001 - any Backend
    infos = {e.key: (e.size, e.pinned, e.children) for e in b.scan()}
    values = b.get_many(sorted(infos))
    return {k: (*infos[k], bytes(v)) for k, v in zip(sorted(infos), values)}


def test_round_trip_keeps_values_links_and_pins(tmp_path: Path) -> None:
    m, _ = _store()
    info = snap.write_snapshot(m, tmp_path)
    assert info.entries == len(_items()) and not [p for p in tmp_path.iterdir()
                                                    if p.name != snap.FILE_NAME]
    header, _ = snap.read_snapshot(info.path)
    assert header["namespaces"][NS.hex()]["layouts"] == [LAYOUT.hex()]
    m2 = MemoryBackend(1 << 24)
    assert snap.load_snapshot(m2, tmp_path) == info.entries
    assert _contents(m2) == _contents(m)  # sizes, pins, children (parent links), bytes
    assert m2.lookup(_query()).boundary == len(HASHES)


def test_parent_written_after_its_child_is_still_linked(tmp_path: Path) -> None:
    """A replaced entry may link to a parent stored after it: the file puts parents first."""
    m = MemoryBackend(1 << 20)
    m.put_many([PutItem(b"child", b"1")])
    m.put_many([PutItem(b"parent", b"2")])
    m.put_many([PutItem(b"child", b"11", b"parent")])  # raw key: replaced, relinked
    snap.write_snapshot(m, tmp_path)
    m2 = MemoryBackend(1 << 20)
    snap.load_snapshot(m2, tmp_path)
    assert {e.key: e.children for e in m2.scan()} == {b"child": 0, b"parent": 1}


def _broken(tmp_path: Path, how: str) -> Path:
    m, _ = _store()
    path = snap.write_snapshot(m, tmp_path).path
    raw = bytearray(path.read_bytes())
    rng = random.Random(how)
    if how == "flip":
        for _ in range(3):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif how.startswith("flip@"):
        raw[int(how[5:]) % len(raw)] ^= 0x10
    elif how.startswith("truncate@"):
        raw = raw[:int(how[9:]) % len(raw)]
    elif how == "foreign":
        raw = bytearray(os.urandom(len(raw)))
    elif how == "version":
        raw[8] = snap.FORMAT_VERSION + 1
    elif how == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))
    return tmp_path


CASES = ["flip", "foreign", "version", "empty", "flip@20", "flip@-1", "flip@-20", "flip@-3000",
         "truncate@10", "truncate@300", "truncate@-1", "truncate@-17", "truncate@-4000"]


@pytest.mark.parametrize("how", CASES)
def test_corrupt_truncated_or_foreign_snapshot_is_ignored(tmp_path: Path, how: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    d = _broken(tmp_path, how)
    with pytest.raises(snap.SnapshotError):
        snap.read_snapshot(d / snap.FILE_NAME)
    m2 = MemoryBackend(1 << 24)
    assert snap.load_snapshot(m2, d) == 0
    assert m2.stats().entries == 0
    assert "ignoring snapshot" in caplog.text


def test_header_that_lies_about_its_records_is_refused(tmp_path: Path) -> None:
    """Digest recomputed after editing the namespace inventory: still refused."""
    m, _ = _store()
    path = snap.write_snapshot(m, tmp_path).path
    raw = path.read_bytes()
    fixed = raw.replace(NS.hex().encode(), b"0" * 32, 1)
    import xxhash

    fixed = fixed[:-16] + xxhash.xxh3_128_digest(fixed[:-16])
    path.write_bytes(fixed)
    with pytest.raises(snap.SnapshotError, match="header does not match"):
        snap.read_snapshot(path)


def test_periodic_snapshots_only_when_the_store_changed(tmp_path: Path) -> None:
    m, items = _store()
    s = snap.Snapshotter(m, tmp_path)
    assert s.write(only_if_changed=True) is None  # nothing changed since it was created
    m.delete_many([items[-1].key])
    assert s.write(only_if_changed=True) is not None
    assert s.write(only_if_changed=True) is None
    assert s.stop() is not None  # shutdown always writes


# -- a real server ---------------------------------------------------------------------------
def _tier(d: Path, port: int | None = None, *args: str, nixl: bool = False) -> TierProcess:
    return TierProcess(port=port, capacity="64MiB", nixl=nixl,
                       extra_args=("--snapshot-dir", str(d), *args))


@pytest.mark.parametrize("nixl", [False, True], ids=["plain-store", "arena-store"])
def test_server_restart_on_sigterm_keeps_the_store(tmp_path: Path, nixl: bool) -> None:
    """Also with the NIXL arena store, whose bytes live in registered regions."""
    items = _items()
    tier = _tier(tmp_path, nixl=nixl).start()
    try:
        with GrpcBackend(tier.url, timeout_s=10) as b:
            assert b.put_many(items) == len(items)
            b.pin([items[0].key])
            before = _contents(b)
            assert b.lookup(_query()).boundary == len(HASHES)
        tier.stop()  # SIGTERM: drain, then snapshot
        assert (tmp_path / snap.FILE_NAME).exists(), server_log(tier)
        tier.start()
        with GrpcBackend(tier.url, timeout_s=10) as b:
            assert _contents(b) == before, server_log(tier)
            assert b.lookup(_query()).boundary == len(HASHES)
            for it in items[:-1]:  # every block restorable, byte for byte
                v = b.get_many([it.key])[0]
                payload.decode(v, BlockKey.decode(it.key), LAYOUT)
    finally:
        tier.kill()


def test_periodic_snapshot_survives_sigkill(tmp_path: Path) -> None:
    items = _items()
    tier = _tier(tmp_path, None, "--snapshot-interval", "0.2").start()
    try:
        with GrpcBackend(tier.url, timeout_s=10) as b:
            b.put_many(items)
        path = tmp_path / snap.FILE_NAME
        wait_until(lambda: path.exists() and snap.read_snapshot(path)[0]["entries"] == len(items),
                   20, "periodic snapshot written")
        tier.kill()  # no shutdown snapshot
        tier.start()
        with GrpcBackend(tier.url, timeout_s=10) as b:
            assert b.stats().entries == len(items)
            assert b.lookup(_query()).boundary == len(HASHES)
    finally:
        tier.kill()


def test_corrupt_snapshot_starts_empty_with_a_warning(tmp_path: Path) -> None:
    items = _items()
    tier = _tier(tmp_path).start()
    try:
        with GrpcBackend(tier.url, timeout_s=10) as b:
            b.put_many(items)
        tier.stop()
        _flip_inside(tmp_path / snap.FILE_NAME, items[3].value)
        tier.start()
        with GrpcBackend(tier.url, timeout_s=10) as b:
            assert b.health()["ok"] and b.stats().entries == 0
            assert b.put_many(items[:2]) == 2  # and serves as usual
        log = server_log(tier)
        assert "ignoring snapshot" in log and "digest mismatch" in log, log
    finally:
        tier.kill()


def _flip_inside(path: Path, value: bytes) -> None:
    """One bit flipped inside a stored value: only the digest can tell."""
    raw = bytearray(path.read_bytes())
    at = raw.find(value)
    assert at > 0
    raw[at + len(value) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
