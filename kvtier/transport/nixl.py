"""NIXL (UCX) one-sided transfers: the agent both tier server and clients run.

The server registers its arena regions once and advertises the agent's metadata
in Health; a reader locates payloads over gRPC (under a lease), then pulls all
of them with one NIXL READ of many descriptors (payloads stored back to back move
as one) into a registered staging buffer or straight into registered local memory
(``read_into``); a writer reserves extents and WRITEs them. No UCX progress thread:
it spins a whole core even when idle (measured here), so the initiator drives
progress by polling the transfer with short, growing sleeps, and the server
pumps progress only while leases or reservations are outstanding
(:class:`ProgressPump`), which its transfers over TCP (other hosts) need.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import xxhash

from kvtier.backends.arena import ALIGN, GEN_BYTES

log = logging.getLogger("kvtier.nixl")
_POPULATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


class NixlError(RuntimeError):
    """A NIXL transfer failed or timed out (the caller treats its keys as misses)."""


def nixl_api():  # noqa: ANN201 - the nixl._api module
    """NIXL's Python API without importing torch when it is not loaded yet.

    The ``nixl`` meta package picks its CUDA build by importing torch (2.6 s here);
    every build carries the same UCX CPU path, so a process without torch takes
    the first one installed (0.3 s).
    """
    import importlib

    if "torch" not in sys.modules:
        for mod in ("nixl_cu13._api", "nixl_cu12._api", "nixl_rocm._api"):
            try:
                return importlib.import_module(mod)
            except ImportError:
                continue
    return importlib.import_module("nixl._api")


def available() -> bool:
    """Whether NIXL with its UCX plug-in can be imported (not whether a peer is reachable)."""
    try:
        nixl_api()
    except Exception:  # noqa: BLE001 - a broken install is "not available", not a crash
        return False
    return True


class NixlAgent:
    """One agent (UCX backend, no progress thread); thread-safe through one lock."""

    def __init__(self, name: str | None = None):
        api = nixl_api()
        nixl_agent, nixl_agent_config = api.nixl_agent, api.nixl_agent_config
        self.name = name or f"kvtier-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        cfg = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False,
                                backends=["UCX"])
        logging.getLogger("nixl").setLevel(logging.WARNING)
        self._agent = nixl_agent(self.name, cfg)
        if "UCX" not in self._agent.backends:
            raise NixlError("NIXL has no UCX backend here")
        self._lock = threading.Lock()
        self._remotes: dict[str, str] = {}  # remote agent name -> name NIXL knows it by

    # -- memory and peers -------------------------------------------------------
    def register(self, regions: Sequence[tuple[int, int]]) -> object:
        """Register (address, length) DRAM regions; returns a handle for :meth:`deregister`."""
        with self._lock:
            try:
                return self._agent.register_memory(
                    [(addr, ln, 0, "") for addr, ln in regions], "DRAM")
            except Exception as e:  # noqa: BLE001 - nixl raises its own error types
                raise NixlError(f"NIXL could not register {len(regions)} regions: {e}") from None

    def deregister(self, handle: object) -> None:
        with self._lock:
            self._agent.deregister_memory(handle)

    def metadata(self) -> bytes:
        with self._lock:
            return self._agent.get_agent_metadata()

    def add_remote(self, name: str, metadata: bytes) -> str:
        """Know a peer (once per agent name; a restarted peer has a new name)."""
        with self._lock:
            known = self._remotes.get(name)
            if known is None:
                known = self._agent.add_remote_agent(metadata)
                known = known.decode() if isinstance(known, bytes) else known
                self._remotes[name] = known
            return known

    def forget_remote(self, name: str) -> None:
        with self._lock:
            known = self._remotes.pop(name, None)
            if known is not None:
                try:
                    self._agent.remove_remote_agent(known)
                except Exception as e:  # noqa: BLE001 - already gone is fine
                    log.debug("remove_remote_agent(%s): %s", known, e)

    # -- transfers ----------------------------------------------------------------
    def transfer(self, op: str, remote: str, local: np.ndarray, remote_descs: np.ndarray,
                 timeout_s: float, settle: bool = False) -> None:
        """One READ or WRITE of many descriptors: ``local``/``remote_descs`` are Nx2
        (address, length) arrays, pairwise equal lengths. Raises :class:`NixlError`.

        A transfer that times out may still be moving bytes. With ``settle`` this does not
        return before it is aborted or over (a READ into memory the caller hands back, a
        KV cache, must never land late); without, the caller never reuses the memory."""
        if len(local) == 0:
            return
        deadline = time.monotonic() + timeout_s
        with self._lock:
            try:
                ld = self._agent.get_xfer_descs(_descs(local), "DRAM")
                rd = self._agent.get_xfer_descs(_descs(remote_descs), "DRAM")
                handle = self._agent.initialize_xfer(op, ld, rd, remote)
                state = self._agent.transfer(handle)
            except Exception as e:  # noqa: BLE001 - nixl raises its own error types
                raise NixlError(f"NIXL {op} to {remote} could not start: {e}") from None
        try:
            sleep = 20e-6
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise NixlError(f"NIXL {op} from {remote} timed out after {timeout_s}s")
                time.sleep(sleep)
                sleep = min(sleep * 2, 2e-3)  # progress from polling, no busy spin
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlError(f"NIXL {op} from {remote} failed ({state})")
        finally:
            self._release_xfer(handle, op, remote, settle)

    def _release_xfer(self, handle: object, op: str, remote: str, settle: bool) -> None:
        """Release (aborting if still under way) a transfer; with ``settle``, keep trying
        while it is still in flight: at worst slower, never a late write."""
        warned = False
        while True:
            with self._lock:
                try:
                    self._agent.release_xfer_handle(handle)
                    return
                except Exception as e:  # noqa: BLE001 - an active transfer may refuse
                    if not settle:
                        log.debug("release_xfer_handle: %s", e)
                        return
                    try:
                        state = self._agent.check_xfer_state(handle)  # drives progress
                    except Exception:  # noqa: BLE001 - a failed handle is not moving bytes
                        state = "ERR"
                    if state != "PROC":  # over: release it if it lets us, and go
                        with contextlib.suppress(Exception):
                            self._agent.release_xfer_handle(handle)
                        return
            if not warned:
                warned = True
                log.warning("NIXL %s from %s still in flight after its deadline; waiting "
                            "for it before its memory is reused", op, remote)
            time.sleep(1e-3)

    def progress(self) -> None:
        """Drive the backend's progress once (what a progress thread would spin on)."""
        with self._lock:
            self._agent.get_new_notifs()


def _descs(pairs: np.ndarray) -> np.ndarray:
    out = np.zeros((len(pairs), 3), dtype=np.uint64)
    out[:, :2] = pairs
    return out


def _spans(address: np.ndarray, length: np.ndarray, region: np.ndarray,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Extents (in request order) grouped into spans read as one descriptor each: the next
    extent of the same region starting less than ``ALIGN`` bytes after one ends (only the
    allocator's padding lies between). A batch written together sits back to back, and
    UCX pays per descriptor (~4 us each here). Returns each span's (address, length) and
    each extent's offset in a staging buffer that mirrors the spans."""
    end = address + length
    gap = address[1:].astype(np.int64) - end[:-1].astype(np.int64)
    joined = (region[1:] == region[:-1]) & (gap >= 0) & (gap < ALIGN)
    first = np.concatenate(([True], ~joined))
    starts = np.flatnonzero(first)
    span_of = np.cumsum(first) - 1
    lasts = np.concatenate((starts[1:] - 1, [len(address) - 1]))
    span_len = end[lasts] - address[starts]
    span_off = np.zeros(len(starts), dtype=np.uint64)
    np.cumsum(span_len[:-1], out=span_off[1:])
    return address[starts], span_len, span_off[span_of] + (address - address[starts][span_of])


class Staging:
    """Registered receive/send buffers, one per thread, reused while nobody views them."""

    def __init__(self, agent: NixlAgent):
        self._agent = agent
        self._local = threading.local()

    def get(self, nbytes: int) -> tuple[mmap.mmap, int]:
        """A registered buffer of at least ``nbytes`` and its address."""
        from kvtier.transport.tcp_bulk import buffer_in_use

        cur = getattr(self._local, "cur", None)
        if cur is not None and len(cur[0]) >= nbytes and not buffer_in_use(cur[0]):
            return cur[0], cur[1]
        if cur is not None:
            self._agent.deregister(cur[2])
        buf = mmap.mmap(-1, max(nbytes, 1 << 20), flags=_POPULATE)
        addr = int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)
        handle = self._agent.register([(addr, len(buf))])
        self._local.cur = (buf, addr, handle)
        return buf, addr

    def discard(self) -> None:
        """Never reuse this thread's buffer (a failed transfer may still write to it); it
        stays registered, so a late write lands in memory nobody reads."""
        self._local.cur = None


class ProgressPump:
    """Calls :meth:`NixlAgent.progress` every ``interval_s`` while ``busy()`` or for a
    moment after :meth:`kick`, and sleeps on an event otherwise (no idle CPU)."""

    def __init__(self, agent: NixlAgent, busy: Callable[[], bool], interval_s: float = 5e-4):
        self._agent, self._busy, self._interval = agent, busy, interval_s
        self._wake = threading.Event()
        self._until = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvtier-nixl-pump", daemon=True)
        self._thread.start()

    def kick(self, for_s: float = 1.0) -> None:
        self._until = max(self._until, time.monotonic() + for_s)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            while not self._stop and (time.monotonic() < self._until or self._busy()):
                try:
                    self._agent.progress()
                except Exception as e:  # noqa: BLE001 - keep pumping; transfers time out
                    log.warning("NIXL progress failed: %s", e)
                time.sleep(self._interval)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(1)


class ServerPlane:
    """The tier server's agent over its arena store, started in the background (creating
    an agent takes most of a second): Health advertises it once ``ready``."""

    def __init__(self, store: object):
        self.store = store
        self.agent: NixlAgent | None = None
        self.metadata = b""
        self.error: str | None = None
        self._pump: ProgressPump | None = None
        self._thread = threading.Thread(target=self._start, name="kvtier-nixl-start",
                                        daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._pump is not None

    def wait_ready(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return self.ready

    def _start(self) -> None:
        try:
            agent = NixlAgent()
            agent.register(self.store.arena.regions())  # type: ignore[attr-defined]
            self.metadata = agent.metadata()
            self.agent = agent
            self._pump = ProgressPump(agent, self.store.outstanding)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - the tier serves over TCP/gRPC without it
            self.error = str(e)
            log.warning("NIXL data plane not started (%s); serving over TCP and gRPC", e)

    def kick(self, for_s: float) -> None:
        if self._pump is not None:
            self._pump.kick(for_s)

    def stop(self) -> None:
        """Let a start still under way finish (an exit inside agent creation aborts), then
        stop pumping."""
        self._thread.join(10)
        if self._pump is not None:
            self._pump.stop()


class NixlClient:
    """A tier client's NIXL side: Locate (gRPC) -> one READ of every payload -> generation
    check -> Release; and Reserve -> one WRITE -> Commit. A failed or torn transfer makes
    its keys misses (reads) or raises :class:`NixlError` (writes: the caller falls back).

    What makes a READ's bytes trustworthy: the lease outlives the call's deadline, so no
    extent read in time can be freed and reused under the reader; the generation word
    each extent starts with catches one that was anyway (a lease the server lost). The
    content itself is checked once, end to end, where every transport's bytes are: each
    kvtier payload carries a checksum of its header and data (:func:`kvtier.payload.decode`).
    """

    def __init__(self, stub: object, timeout_s: float):
        self._stub = stub
        self.timeout_s = timeout_s
        self.agent = NixlAgent()
        self._staging = Staging(self.agent)
        self.torn = 0  # payloads read but refused (their extent's generation changed)
        self._registered: set[tuple[int, int]] = set()  # local memory read_into may fill
        self._to_release: queue.Queue[tuple[int, int]] = queue.Queue()  # (lease, bytes read)
        self._releaser: threading.Thread | None = None
        self._rel_lock = threading.Lock()

    def connect(self, name: str, metadata: bytes) -> str:
        return self.agent.add_remote(name, metadata)

    def read(self, server: str, keys: Sequence[bytes], deadline: float) -> list[memoryview | None]:
        """Payloads of ``keys`` (None: missing or changed)."""
        return self._read(server, keys, deadline,
                          lambda located: self.fetch(server, located, deadline))

    def read_into(self, server: str, keys: Sequence[bytes], head_bytes: int,
                  places: Sequence[Sequence[tuple[int, int]]], deadline: float,
                  ) -> list[memoryview | None]:
        """Each payload's first ``head_bytes`` (returned, from staging) and the rest straight
        into ``places[i]``: (address, length) runs of registered local memory, filled in
        order. None where missing, changed, or not the size the places add up to: those
        places may hold anything, and so may all of them until the caller validated."""
        return self._read(server, keys, deadline, lambda located: self._fetch_into(
            server, located, head_bytes, places, deadline))

    def register_local(self, regions: Sequence[tuple[int, int]]) -> None:
        """Register local memory that :meth:`read_into` may place bytes in (once each)."""
        new = [r for r in dict.fromkeys(regions) if r not in self._registered]
        if new:
            self.agent.register(new)
            self._registered.update(new)

    def _read(self, server: str, keys: Sequence[bytes], deadline: float,
              fetch: Callable) -> list[memoryview | None]:
        """Locate, READ (``fetch``), Release. One Locate for all keys: cutting a read into
        parts with the next Locate in flight gained nothing here (NIXL's UCX READ between
        two processes of one host is a copy that holds the GIL, which gRPC's client needs
        to move the next call)."""
        located = self.locate(server, keys, deadline)
        read_bytes = 0
        try:
            got, read_bytes = fetch(located)
            return got
        finally:
            self._release(located.lease_id, read_bytes, wait=False)

    def locate(self, server: str, keys: Sequence[bytes], deadline: float):  # noqa: ANN201
        """The LocateReply for ``keys``: their extents under a lease (release it!)."""
        from kvtier.proto import tier_pb2 as pb

        left = max(1e-3, deadline - time.monotonic())
        # The lease ends well after the deadline: a READ still running then is abandoned.
        r = self._stub.Locate(pb.LocateRequest(keys=list(keys), lease_s=min(60.0, 2 * left + 1)),
                              timeout=left)
        if r.nixl_agent != server:
            self._release(r.lease_id, 0, wait=False)
            raise NixlError(f"tier agent changed ({server} -> {r.nixl_agent})")
        if not len(r.address) == len(r.length) == len(r.generation) == len(r.region) == len(keys):
            self._release(r.lease_id, 0, wait=False)
            raise NixlError(f"tier answered {len(r.address)} extents for {len(keys)} keys")
        return r

    def fetch(self, server: str, located, deadline: float,  # noqa: ANN001 - a LocateReply
              ) -> tuple[list[memoryview | None], int]:
        """One READ of every found extent into staging; payloads whose generation word
        differs from the located one (freed and reused) are None."""
        remote = self._remotes_name(server)
        lens_all = np.array(located.length, dtype=np.int64)
        found = np.flatnonzero(lens_all > 0)
        out: list[memoryview | None] = [None] * len(lens_all)
        if not len(found):
            return out, 0
        lens = lens_all[found].astype(np.uint64)
        start, span_len, offs = _spans(np.array(located.address, dtype=np.uint64)[found], lens,
                                       np.array(located.region, dtype=np.uint32)[found])
        buf, addr = self._staging.get(int(span_len.sum()))
        local = np.stack([np.cumsum(span_len) - span_len + np.uint64(addr), span_len], axis=1)
        # Half the time left: a transfer that hangs leaves the other half to TCP or gRPC.
        try:
            self.agent.transfer("READ", remote, local, np.stack([start, span_len], axis=1),
                                max(1e-3, (deadline - time.monotonic()) / 2))
        except NixlError:
            self._staging.discard()  # a late-landing READ must never write into a reuse
            raise
        # Every extent's first word against the generation Locate saw, in one pass.
        words = np.frombuffer(buf, dtype=np.uint8)[
            offs.astype(np.int64)[:, None] + np.arange(GEN_BYTES)].copy().view("<u8")[:, 0]
        good = words == np.array(located.generation, dtype=np.uint64)[found]
        self.torn += int(len(good) - good.sum())
        view = memoryview(buf)
        read_bytes = 0
        for i, off, n, ok in zip(found.tolist(), offs.tolist(), lens.tolist(), good.tolist()):
            if ok:
                out[i] = view[off + GEN_BYTES:off + n]
                read_bytes += n - GEN_BYTES
        return out, read_bytes

    def _fetch_into(self, server: str, located, head_bytes: int,  # noqa: ANN001
                    places: Sequence[Sequence[tuple[int, int]]], deadline: float,
                    ) -> tuple[list[memoryview | None], int]:
        remote = self._remotes_name(server)
        head = GEN_BYTES + head_bytes
        out: list[memoryview | None] = [None] * len(places)
        want = [(i, a, n) for i, (a, n) in enumerate(zip(located.address, located.length))
                if n > 0 and n == head + sum(ln for _, ln in places[i])]
        if not want:
            return out, 0
        buf, addr = self._staging.get(head * len(want))
        local, rem = [], []
        for j, (i, a, _) in enumerate(want):
            local.append((addr + j * head, head))
            rem.append((a, head))
            pos = a + head
            for dst, ln in places[i]:
                local.append((dst, ln))
                rem.append((pos, ln))
                pos += ln
        try:
            self.agent.transfer("READ", remote, np.array(local, dtype=np.uint64),
                                np.array(rem, dtype=np.uint64),
                                max(1e-3, (deadline - time.monotonic()) / 2), settle=True)
        except NixlError:
            self._staging.discard()
            raise
        view = memoryview(buf)
        read_bytes = 0
        for j, (i, _, n) in enumerate(want):
            off = j * head
            if int.from_bytes(view[off:off + GEN_BYTES], "little") != located.generation[i]:
                self.torn += 1
                continue
            out[i] = view[off + GEN_BYTES:off + head]
            read_bytes += n - GEN_BYTES
        return out, read_bytes

    def _release(self, lease_id: int, read_bytes: int, wait: bool = True) -> None:
        """End a lease (and report the bytes read, for the tier's metrics); without
        ``wait`` a background thread sends it (:meth:`drain` waits for it): a gRPC
        future would start a thread per call, costing the reader more than the call."""
        if not lease_id:
            return
        if wait:
            self._send_release(lease_id, read_bytes)
            return
        with self._rel_lock:
            if self._releaser is None:
                self._releaser = threading.Thread(target=self._release_loop, daemon=True,
                                                  name="kvtier-nixl-release")
                self._releaser.start()
        self._to_release.put((lease_id, read_bytes))

    def _send_release(self, lease_id: int, read_bytes: int) -> None:
        from kvtier.proto import tier_pb2 as pb

        try:
            self._stub.Release(pb.ReleaseRequest(lease_id=lease_id, read_bytes=read_bytes),
                               timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - the lease expires by itself
            log.debug("release of lease %d failed: %s", lease_id, e)

    def _release_loop(self) -> None:
        while True:
            lease_id, read_bytes = self._to_release.get()
            try:
                self._send_release(lease_id, read_bytes)
            finally:
                self._to_release.task_done()

    def drain(self, timeout_s: float = 2.0) -> None:
        """Wait (up to ``timeout_s``) for releases not sent yet (before the channel closes)."""
        end = time.monotonic() + timeout_s
        while self._to_release.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.005)

    def write(self, server: str, items: Sequence, deadline: float) -> int:
        """Store ``items`` (PutItem) by Reserve, one WRITE, Commit; returns how many stored."""
        from kvtier.proto import tier_pb2 as pb

        remote = self._remotes_name(server)
        left = max(1e-3, deadline - time.monotonic())
        r = self._stub.Reserve(pb.ReserveRequest(sizes=[len(it.value) for it in items],
                                                 ttl_s=min(60.0, 2 * left + 1)), timeout=left)
        if r.nixl_agent != server:
            raise NixlError(f"tier agent changed ({server} -> {r.nixl_agent})")
        idx = [i for i, e in enumerate(r.extents) if e.length > 0]
        total = sum(len(items[i].value) for i in idx)
        buf, addr = self._staging.get(total)
        view = memoryview(buf)
        local, rem, commit, pos = [], [], [], 0
        for i in idx:
            v, e = items[i].value, r.extents[i]
            view[pos:pos + len(v)] = v
            local.append((addr + pos, len(v)))
            rem.append((e.address + GEN_BYTES, len(v)))  # the server writes the generation
            commit.append(pb.CommitItem(index=i, key=items[i].key, parent=items[i].parent or b"",
                                        checksum=xxhash.xxh3_64_intdigest(view[pos:pos + len(v)])))
            pos += len(v)
        del view
        if local:
            self.agent.transfer("WRITE", remote, np.array(local, dtype=np.uint64),
                                np.array(rem, dtype=np.uint64),
                                max(1e-3, deadline - time.monotonic()))
        left = max(1e-3, deadline - time.monotonic())
        return self._stub.Commit(pb.CommitRequest(reservation_id=r.reservation_id, items=commit),
                                 timeout=left).stored

    def _remotes_name(self, server: str) -> str:
        known = self.agent._remotes.get(server)
        if known is None:
            raise NixlError(f"tier agent {server} not connected")
        return known



class NixlPath:
    """A gRPC tier client's NIXL route: used once the tier's Health advertises an agent and
    NIXL imports here; rechecked every ``retry_s`` while it is not (or after a failure)."""

    def __init__(self, stub: object, timeout_s: float, retry_s: float, url: str):
        self._stub, self.timeout_s, self._retry_s, self.url = stub, timeout_s, retry_s, url
        self._client: NixlClient | None = None
        self._server: str | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._last_warn = 0.0
        self.failures = 0  # transfers that failed (their reads were misses)

    def close(self) -> None:
        """Let in-flight lease releases reach the tier before the channel goes."""
        if self._client is not None:
            self._client.drain()

    def _ready(self) -> str | None:
        """The tier agent's name when both sides have NIXL, else None."""
        from kvtier.proto import tier_pb2 as pb

        with self._lock:
            if self._server is not None or time.monotonic() < self._retry_at:
                return self._server
            self._retry_at = time.monotonic() + self._retry_s
            h = self._stub.Health(pb.HealthRequest(), timeout=self.timeout_s)
            if not h.nixl_agent or not available():
                return None
            if self._client is None:
                self._client = NixlClient(self._stub, self.timeout_s)
            self._client.connect(h.nixl_agent, h.nixl_metadata)
            self._server = h.nixl_agent
            return self._server

    def _failed(self, what: str, e: Exception) -> None:
        with self._lock:
            self._server = None  # ask Health again later: the tier may have restarted
            self._retry_at = time.monotonic() + self._retry_s
        self.failures += 1
        now = time.monotonic()
        if now - self._last_warn > 10:
            self._last_warn = now
            log.warning("NIXL %s on tier %s failed (%s); moving bytes over TCP/gRPC for %gs",
                        what, self.url, e, self._retry_s)

    def get(self, keys: Sequence[bytes], deadline: float) -> list[memoryview | None] | None:
        """Payloads (None: missing or changed under the reader); None if NIXL is not usable
        with this tier right now, or the transfer failed with time left in the call: the
        caller reads another way (TCP, gRPC). A failure at the deadline: all misses."""
        server = self._ready()
        if server is None or self._client is None:
            return None
        try:
            return self._client.read(server, keys, deadline)
        except NixlError as e:
            self._failed("read", e)
            return None if deadline - time.monotonic() > 0.1 * self.timeout_s else [None] * len(
                keys)

    def get_into(self, keys: Sequence[bytes], head_bytes: int,
                 places: Sequence[Sequence[tuple[int, int]]],
                 regions: Sequence[tuple[int, int]], deadline: float,
                 ) -> list[memoryview | None] | None:
        """:meth:`NixlClient.read_into`, or None as :meth:`get` (read another way)."""
        server = self._ready()
        if server is None or self._client is None:
            return None
        try:
            self._client.register_local(regions)
            return self._client.read_into(server, keys, head_bytes, places, deadline)
        except NixlError as e:
            self._failed("read", e)
            return None

    def put(self, items: Sequence, deadline: float) -> int | None:
        """How many were stored over NIXL; None if not usable or failed (write another way)."""
        server = self._ready()
        if server is None or self._client is None:
            return None
        try:
            return self._client.write(server, items, deadline)
        except NixlError as e:
            self._failed("write", e)
            return None
