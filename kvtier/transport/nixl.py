"""NIXL (UCX) one-sided transfers: the agent both tier server and clients run.

The server registers its arena regions once and advertises the agent's metadata
in Health; a reader locates payloads over gRPC (under a lease), then pulls all
of them with *one* NIXL READ of many descriptors into a registered staging
buffer; a writer reserves extents and WRITEs them. No UCX progress thread:
it spins a whole core even when idle (measured here), so the initiator drives
progress by polling the transfer with short, growing sleeps, and the server
pumps progress only while leases or reservations are outstanding
(:class:`ProgressPump`), which its transfers over TCP (other hosts) need.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import xxhash

from kvtier.backends.arena import GEN_BYTES

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
            return self._agent.register_memory(
                [(addr, ln, 0, "") for addr, ln in regions], "DRAM")

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
                 timeout_s: float) -> None:
        """One READ or WRITE of many descriptors: ``local``/``remote_descs`` are Nx2
        (address, length) arrays, pairwise equal lengths. Raises :class:`NixlError`."""
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
            with self._lock:
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception as e:  # noqa: BLE001 - an aborted transfer may refuse
                    log.debug("release_xfer_handle: %s", e)

    def progress(self) -> None:
        """Drive the backend's progress once (what a progress thread would spin on)."""
        with self._lock:
            self._agent.get_new_notifs()


def _descs(pairs: np.ndarray) -> np.ndarray:
    out = np.zeros((len(pairs), 3), dtype=np.uint64)
    out[:, :2] = pairs
    return out


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
    """A tier client's NIXL side: Locate (gRPC) -> one READ of every payload -> validate
    -> Release; and Reserve -> one WRITE -> Commit. A failed or torn transfer makes its
    keys misses (reads) or raises :class:`NixlError` (writes: the caller falls back)."""

    def __init__(self, stub: object, timeout_s: float):
        self._stub = stub
        self.timeout_s = timeout_s
        self.agent = NixlAgent()
        self._staging = Staging(self.agent)
        self.torn = 0  # payloads read but refused (generation or checksum changed)

    def connect(self, name: str, metadata: bytes) -> str:
        return self.agent.add_remote(name, metadata)

    def read(self, server: str, keys: Sequence[bytes], deadline: float) -> list[memoryview | None]:
        r = self.locate(server, keys, deadline)
        read_bytes = 0
        try:
            out, read_bytes = self.fetch(server, r.extents, deadline)
            return out
        finally:
            self._release(r.lease_id, read_bytes)

    def locate(self, server: str, keys: Sequence[bytes], deadline: float):  # noqa: ANN201
        """The LocateReply for ``keys``: their extents under a lease (release it!)."""
        from kvtier.proto import tier_pb2 as pb

        left = max(1e-3, deadline - time.monotonic())
        r = self._stub.Locate(pb.LocateRequest(keys=list(keys), lease_s=min(60.0, 2 * left + 1)),
                              timeout=left)
        if r.nixl_agent != server:
            self._release(r.lease_id, 0)
            raise NixlError(f"tier agent changed ({server} -> {r.nixl_agent})")
        return r

    def fetch(self, server: str, extents: Sequence, deadline: float,
              ) -> tuple[list[memoryview | None], int]:
        """One READ of every found extent into staging; payloads whose generation word or
        checksum differ from the extent's (freed, reused, corrupted) are None."""
        remote = self._remotes_name(server)
        out: list[memoryview | None] = [None] * len(extents)
        found = [(i, e) for i, e in enumerate(extents) if e.length > 0]
        if not found:
            return out, 0
        total = sum(e.length for _, e in found)
        buf, addr = self._staging.get(total)
        lens = np.fromiter((e.length for _, e in found), dtype=np.uint64, count=len(found))
        offs = np.zeros(len(found), dtype=np.uint64)
        np.cumsum(lens[:-1], out=offs[1:])
        local = np.stack([offs + np.uint64(addr), lens], axis=1)
        rem = np.stack([np.fromiter((e.address for _, e in found), dtype=np.uint64,
                                    count=len(found)), lens], axis=1)
        # Half the time left: a transfer that hangs leaves the other half to TCP or gRPC.
        try:
            self.agent.transfer("READ", remote, local, rem,
                                max(1e-3, (deadline - time.monotonic()) / 2))
        except NixlError:
            self._staging.discard()  # a late-landing READ must never write into a reuse
            raise
        view = memoryview(buf)
        read_bytes = 0
        for (i, e), off in zip(found, offs.tolist()):
            payload = view[off + GEN_BYTES:off + e.length]
            if (int.from_bytes(view[off:off + GEN_BYTES], "little") != e.generation
                    or xxhash.xxh3_64_intdigest(payload) != e.checksum):
                self.torn += 1
                continue
            out[i] = payload
            read_bytes += payload.nbytes
        return out, read_bytes

    def _release(self, lease_id: int, read_bytes: int) -> None:
        from kvtier.proto import tier_pb2 as pb

        if not lease_id:
            return
        try:
            self._stub.Release(pb.ReleaseRequest(lease_id=lease_id, read_bytes=read_bytes),
                               timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - the lease expires by itself
            log.debug("release of lease %d failed: %s", lease_id, e)

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
