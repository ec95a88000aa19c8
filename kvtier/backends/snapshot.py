"""Warm restart: the memory store written to disk and read back at start.

A tier restart otherwise empties the cache of a whole fleet. ``kvtier serve
--snapshot-dir DIR`` writes the store to ``DIR/tier.snapshot`` on shutdown (and
every ``--snapshot-interval`` seconds when it changed) and loads it at start.

File (little-endian)::

    b"KVTSNAP\\0" u32 format, u32 header length, header (JSON: kvtier version,
    store, entries, bytes, namespaces -> entries/bytes/layout digests)
    records: u16 key length, u16 parent length, u8 flags (1: pinned),
             u64 value length, key, parent, value
    trailer: b"KVTSEND\\0" u64 records, xxh3-128 of everything before it

The file is written to a temporary name, fsynced and renamed over the old
one, so a crash mid-write leaves the previous snapshot. A snapshot that is
truncated, corrupt (digest), of another format or not a kvtier snapshot is
ignored with a warning: the server starts empty, never with doubtful bytes.
Each block value also keeps its own payload checksum (:mod:`kvtier.payload`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash

from kvtier import __version__
from kvtier.backends.base import PutItem
from kvtier.backends.memory import MemoryBackend
from kvtier.keys import is_manifest_key, namespace_of
from kvtier.payload import PayloadError, read_header

log = logging.getLogger("kvtier.snapshot")
MAGIC, END = b"KVTSNAP\0", b"KVTSEND\0"
FORMAT_VERSION = 1
FILE_NAME = "tier.snapshot"
_HEAD = struct.Struct("<8sII")
_REC = struct.Struct("<HHBQ")
_TAIL = struct.Struct("<8sQ")  # then the 16-byte digest
MAX_HEADER = 64 << 20
FLAG_PINNED = 1
_IO_CHUNK = 8 << 20


class SnapshotError(ValueError):
    """A snapshot that must not be loaded (truncated, corrupt, foreign)."""


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    entries: int
    bytes: int
    seconds: float


def _namespace_of(key: bytes) -> str:
    ns = namespace_of(key)
    return ns.hex() if ns else ""  # a raw key (tests, other tools): stored, listed under ""


def _describe(items: list[tuple[PutItem, bool]]) -> dict:
    namespaces: dict[str, dict] = {}
    for it, _ in items:
        ns = namespaces.setdefault(_namespace_of(it.key), {"entries": 0, "bytes": 0,
                                                             "layouts": set()})
        ns["entries"] += 1
        ns["bytes"] += len(it.value)
        if not is_manifest_key(it.key):
            with contextlib.suppress(PayloadError):
                ns["layouts"].add(read_header(it.value).layout.hex())
    for ns in namespaces.values():
        ns["layouts"] = sorted(ns["layouts"])
    return {"kvtier": __version__, "store": "memory", "created": time.time(),
            "entries": len(items), "bytes": sum(len(it.value) for it, _ in items),
            "namespaces": namespaces}


def _parents_first(items: list[tuple[PutItem, bool]]) -> list[tuple[PutItem, bool]]:
    """Order so every parent precedes its children (a put links only to a stored parent)."""
    by_key = {it.key: (it, pinned) for it, pinned in items}
    done: set[bytes] = set()
    out: list[tuple[PutItem, bool]] = []
    for it, _ in items:
        chain = []
        k: bytes | None = it.key
        while k is not None and k not in done and k in by_key:
            done.add(k)
            chain.append(by_key[k])
            k = by_key[k][0].parent
        out.extend(reversed(chain))
    return out


class _Writer:
    def __init__(self, f: BinaryIO):
        self.f, self.h = f, xxhash.xxh3_128()

    def write(self, b: bytes | memoryview) -> None:
        self.h.update(b)
        self.f.write(b)


def write_snapshot(store: MemoryBackend, directory: str | Path) -> SnapshotInfo:
    """Write ``store`` to ``directory/tier.snapshot`` atomically (tmp + fsync + rename)."""
    t0 = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = _parents_first(store.export())
    header = json.dumps(_describe(items), sort_keys=True).encode()
    path = directory / FILE_NAME
    tmp = directory / f".{FILE_NAME}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb", buffering=_IO_CHUNK) as f:
            w = _Writer(f)
            w.write(_HEAD.pack(MAGIC, FORMAT_VERSION, len(header)))
            w.write(header)
            for it, pinned in items:
                parent = it.parent or b""
                w.write(_REC.pack(len(it.key), len(parent), FLAG_PINNED if pinned else 0,
                                  len(it.value)))
                w.write(it.key + parent)
                w.write(memoryview(it.value))
            w.write(_TAIL.pack(END, len(items)))
            f.write(w.h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        tmp.unlink(missing_ok=True)
    nbytes = sum(len(it.value) for it, _ in items)
    return SnapshotInfo(path, len(items), nbytes, time.perf_counter() - t0)


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left, self.h = f, size, xxhash.xxh3_128()

    def read(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise SnapshotError(f"truncated snapshot: {what} needs {n} bytes, {self.left} left")
        b = self.f.read(n)
        if len(b) != n:
            raise SnapshotError(f"truncated snapshot while reading {what}")
        self.left -= n
        self.h.update(b)
        return b


def read_snapshot(path: str | Path) -> tuple[dict, list[tuple[PutItem, bool]]]:
    """The header and entries of a snapshot file; raises SnapshotError if it is unusable.

    Every length is checked against what is left of the file before anything is
    allocated, and nothing is returned unless the whole-file digest matches."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb", buffering=_IO_CHUNK) as f:
        r = _Reader(f, size - 16)  # the digest itself is not hashed
        if size < _HEAD.size + _TAIL.size + 16:
            raise SnapshotError(f"truncated snapshot ({size} bytes)")
        magic, version, hlen = _HEAD.unpack(r.read(_HEAD.size, "file header"))
        if magic != MAGIC:
            raise SnapshotError("not a kvtier snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise SnapshotError(f"snapshot format {version}, this kvtier reads {FORMAT_VERSION}")
        if hlen > MAX_HEADER:
            raise SnapshotError(f"snapshot header of {hlen} bytes is implausible")
        try:
            header = json.loads(r.read(hlen, "header"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"corrupt snapshot header: {e}") from None
        if not isinstance(header, dict) or header.get("store") != "memory":
            raise SnapshotError("snapshot is not of a kvtier memory store")
        items: list[tuple[PutItem, bool]] = []
        while r.left > 16:
            klen, plen, flags, vlen = _REC.unpack(r.read(_REC.size, "record header"))
            kp = r.read(klen + plen, "key")
            value = r.read(vlen, "value")
            items.append((PutItem(kp[:klen], value, kp[klen:] or None), bool(flags & FLAG_PINNED)))
        end = r.read(16, "trailer")
        digest = f.read(16)
    magic, count = _TAIL.unpack(end)
    if magic != END or count != len(items):
        raise SnapshotError("corrupt snapshot trailer")
    if digest != r.h.digest():
        raise SnapshotError("snapshot digest mismatch: file is corrupt")
    _check_header(header, items)
    return header, items


def _check_header(header: dict, items: list[tuple[PutItem, bool]]) -> None:
    """The header's namespace inventory must describe exactly these records."""
    want = header.get("namespaces")
    got = _describe(items)["namespaces"]
    if header.get("entries") != len(items) or not isinstance(want, dict) or want != got:
        raise SnapshotError("snapshot header does not match its records (foreign or corrupt)")


def load_snapshot(store: MemoryBackend, directory: str | Path) -> int:
    """Fill ``store`` from ``directory``'s snapshot; returns entries stored.

    A missing snapshot is a cold start; an unusable one is logged and ignored."""
    path = Path(directory) / FILE_NAME
    if not path.exists():
        log.info("no snapshot at %s: starting empty", path)
        return 0
    t0 = time.perf_counter()
    try:
        header, items = read_snapshot(path)
    except (SnapshotError, OSError) as e:
        log.warning("ignoring snapshot %s: %s; starting with an empty store", path, e)
        return 0
    stored = 0
    for batch in _batches(items, 1024):
        stored += store.put_many([it for it, _ in batch])
    pinned = [it.key for it, p in items if p]
    if pinned:
        store.pin(pinned)
    log.info("loaded snapshot %s: %d of %d entries (%d bytes, %d namespaces, written by kvtier "
             "%s) in %.2fs", path, stored, len(items), header.get("bytes", 0),
             len(header.get("namespaces", {})), header.get("kvtier"), time.perf_counter() - t0)
    return stored


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Snapshotter:
    """Writes the store every ``interval_s`` (if it changed) and once more on :meth:`stop`."""

    def __init__(self, store: MemoryBackend, directory: str | Path, interval_s: float = 0):
        self.store, self.directory, self.interval_s = store, Path(directory), interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last: tuple | None = self._state()
        self._thread: threading.Thread | None = None
        self.written = 0

    def _state(self) -> tuple:
        s = self.store.stats()
        return (s.entries, s.bytes_used, s.puts, s.evictions, s.pinned)

    def start(self) -> Snapshotter:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="kvtier-snapshot", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write(only_if_changed=True)

    def write(self, only_if_changed: bool = False) -> SnapshotInfo | None:
        with self._lock:
            state = self._state()
            if only_if_changed and state == self._last:
                return None
            try:
                info = write_snapshot(self.store, self.directory)
            except OSError as e:
                log.error("snapshot to %s failed: %s (previous snapshot kept)", self.directory, e)
                return None
            self._last = state
            self.written += 1
            log.info("snapshot: %d entries, %d bytes to %s in %.2fs", info.entries, info.bytes,
                     info.path, info.seconds)
            return info

    def stop(self) -> SnapshotInfo | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.write()


def start_snapshots(store: object, directory: str | Path | None,
                    interval_s: float = 0) -> Snapshotter | None:
    """Load ``directory``'s snapshot into a memory ``store`` and keep snapshotting it
    (the server's ``--snapshot-dir``); None when off or the store is not a memory store."""
    if not directory:
        return None
    if not isinstance(store, MemoryBackend):
        log.warning("--snapshot-dir ignored: the %s backend is not the memory store",
                    getattr(store, "name", "?"))
        return None
    load_snapshot(store, directory)
    return Snapshotter(store, directory, interval_s).start()
