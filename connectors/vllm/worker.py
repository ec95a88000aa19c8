"""Worker side of the connector: moves bytes between vLLM's paged cache and the tier.

Loads run in a background thread while the request waits: one batched fetch,
every payload validated (key, layout, length, checksum), then one scatter per
group. Any failure reports the request as a failed receive, so vLLM
recomputes it: at worst slower, never wrong.

Saves are gathered at the end of the step that wrote them (so the request
still owns the blocks) into one staging buffer, and uploaded by a background
thread; a full queue or an unreachable tier drops saves, never stalls decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch
from kvtier.connectors.vllm.layout import CacheLayout
from kvtier.connectors.vllm.metadata import BlockIO, KVTierMetadata, LoadJob
from kvtier.connectors.vllm.stats import ConnectorStats

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.guard import GuardedBackend
from kvtier.config import ConnectorConfig
from kvtier.kernels import CopyPath, select
from kvtier.kernels.torch_copy import BlockView, byte_run
from kvtier.keys import BlockKey
from kvtier.lookup import GroupKind

log = logging.getLogger("kvtier.connector")
_STOP = object()


def _memory(address: int, nbytes: int) -> memoryview:
    """A view of ``nbytes`` of this process's memory at ``address`` (a KV-cache block the
    worker holds alive)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _block_view(t: torch.Tensor, num_blocks: int) -> BlockView:
    for dim in (0, 1):
        if t.dim() > dim and t.shape[dim] == num_blocks:
            return BlockView(t, dim)
    raise ValueError(f"no block dimension of size {num_blocks} in KV tensor {tuple(t.shape)}")


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, layout: CacheLayout, tier: GuardedBackend,
                 upload_tier: GuardedBackend,
                 stats: ConnectorStats, rank: int, num_blocks: int):
        self.cfg = cfg
        self.layout = layout
        self.tier = tier
        # Uploads get their own connection: a save stuck on a sick tier must not
        # mark the load path down (or the other way round).
        self.upload_tier = upload_tier
        self.stats = stats
        stats.watch_tier("load", tier)
        stats.watch_tier("upload", upload_tier)
        self.rank = rank
        self.num_blocks = num_blocks
        self.ns = layout.namespace(cfg.tenant).id
        self.views: dict[int, list[BlockView]] = {}
        self.digests: dict[int, bytes] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
        self._results_lock = threading.Lock()
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self._device_sync = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.save_queue_blocks // 16))
        self._uploader: threading.Thread | None = None
        self._unsent = 0  # blocks queued or uploading: what a shutdown would drop
        self._unsent_lock = threading.Lock()
        self._kernels: dict[int, CopyPath] = {}  # per group: Triton or torch
        # Per group, each view's (address of block 0, bytes to the next block, block bytes)
        # when every view's blocks are plain CPU byte runs: loads then land straight in
        # the blocks (Backend.read_into) where the tier can place bytes (NIXL).
        self._places: dict[int, list[tuple[int, int, int]]] = {}
        self._regions: list[tuple[int, int]] = []

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for g in self.layout.groups:
            views: list[BlockView] = []
            for name in g.layer_names:
                t = kv_caches[name]
                tensors = list(t) if isinstance(t, (list, tuple)) else [t]
                views.extend(_block_view(x, self.num_blocks) for x in tensors)
            self.views[g.group_id] = views
            desc = f"g{g.group_id}|" + "|".join(v.describe() for v in views)
            self.digests[g.group_id] = payload.layout_digest(desc)
            self._kernels[g.group_id] = select(views, label=f"KV-cache group {g.group_id}")
            runs = [byte_run(v) for v in views]
            if self.cfg.direct_reads and all(r is not None for r in runs):
                self._places[g.group_id] = [(a, step, v.block_nbytes)
                                            for (a, step), v in zip(runs, views)]  # type: ignore[misc]
                storages = [v.tensor.untyped_storage() for v in views]
                self._regions.extend(dict.fromkeys((st.data_ptr(), st.nbytes())
                                                   for st in storages))
        first = next(iter(kv_caches.values()))
        device = (first[0] if isinstance(first, (list, tuple)) else first).device
        if device.type == "cuda":  # loads scatter from the loader thread: wait for them
            self._device_sync = lambda: torch.cuda.synchronize(device)
        self._uploader = threading.Thread(target=self._upload_loop, name="kvtier-upload",
                                          daemon=True)
        self._uploader.start()

    def _key(self, gid: int, h: bytes) -> BlockKey:
        return BlockKey(self.ns, self.rank, gid, h)

    # -- loads ---------------------------------------------------------------
    def start_load_kv(self, meta: KVTierMetadata) -> None:
        """Run this step's loads: inline when the step has no forward work to delay
        (the engine would only spin, competing for the GIL), else in the background."""
        for job in meta.loads:
            if meta.inline_loads:
                self._run_load(job)
            else:
                self._loader.submit(self._run_load, job)

    def _run_load(self, job: LoadJob) -> None:
        t0 = time.perf_counter()
        self.stats.loads_in_flight.inc()
        try:
            ok = self._load(job)
        except Exception as e:  # noqa: BLE001 - a load failure is a miss, never a crash
            log.warning("kvtier: load of %s failed unexpectedly (%s); recomputing", job.req_id, e)
            self.stats.error("load_exception")
            ok = False
        finally:
            self.stats.loads_in_flight.dec()
        self.stats.latency.labels("load").observe(time.perf_counter() - t0)
        with self._results_lock:
            self._finished.add(job.req_id)
            if not ok:
                self._failed.add(job.req_id)
                self.stats.add("requests_load_failed")
            else:
                self.stats.add("requests_loaded")

    def _load(self, job: LoadJob) -> bool:
        if not job.blocks:
            return False
        keys = [self._key(b.group_id, b.block_hash).encode() for b in job.blocks]
        unique = list(dict.fromkeys(keys))
        if len(unique) == len(keys) and all(b.group_id in self._places for b in job.blocks):
            done = self._load_direct(job, keys)
            if done is not None:
                return done
        got = self.tier.get_many(unique)
        if got is None:  # an outage, not a miss: nothing is known about the blocks
            self.stats.error("tier_unavailable")
            log.warning("kvtier: tier unavailable for the load of %s; recomputing", job.req_id)
            return False
        fetched = dict(zip(unique, got))
        by_group: dict[int, list[tuple[int, memoryview]]] = defaultdict(list)
        corrupt: list[bytes] = []
        for b, k in zip(job.blocks, keys):
            raw = fetched[k]
            if raw is None:
                return self._vanished(job)
            try:
                data = payload.decode(raw, self._key(b.group_id, b.block_hash),
                                      self.digests[b.group_id])
                expect = sum(v.block_nbytes for v in self.views[b.group_id])
                if data.nbytes != expect:
                    raise payload.PayloadError(f"{data.nbytes} bytes, expected {expect}")
            except payload.PayloadError as e:
                self._invalid(job, k, e, corrupt)
                continue
            by_group[b.group_id].append((b.block_id, data))
        if corrupt:
            return self._drop(corrupt)
        for gid, items in by_group.items():
            # The decoded payloads as they are: the CPU path copies each straight into its
            # block (no joined copy of the restore); Triton joins them into one tensor.
            rows = [d for _, d in items]
            self._kernels[gid].scatter(self.views[gid], [bid for bid, _ in items], rows)
            self.stats.moved("loaded", len(items), sum(d.nbytes for d in rows))
        if self._device_sync is not None:
            self._device_sync()
        return True

    def _load_direct(self, job: LoadJob, keys: list[bytes]) -> bool | None:
        """Each payload's data straight into its blocks, checked where it landed; None when
        the tier cannot place bytes here now (read through staging instead). Blocks of a
        failed load hold anything: the request recomputes them, as after any failed load."""
        places = [[(a + b.block_id * step, n) for a, step, n in self._places[b.group_id]]
                  for b in job.blocks]
        heads = self.tier.read_into(keys, payload.HEADER_SIZE, places, self._regions)
        if heads is None:
            return None
        corrupt: list[bytes] = []
        for b, k, head, runs in zip(job.blocks, keys, heads, places):
            if head is None:
                return self._vanished(job)
            try:
                payload.check_split(head, [_memory(a, n) for a, n in runs],
                                    self._key(b.group_id, b.block_hash), self.digests[b.group_id])
            except payload.PayloadError as e:
                self._invalid(job, k, e, corrupt)
        if corrupt:
            return self._drop(corrupt)
        nbytes = sum(n for runs in places for _, n in runs)
        self.stats.moved("loaded", len(keys), nbytes)
        self.stats.add("blocks_loaded_direct", len(keys))
        return True

    def _vanished(self, job: LoadJob) -> bool:
        self.stats.error("load_missing")
        log.warning("kvtier: block of %s vanished before its load; recomputing", job.req_id)
        return False

    def _invalid(self, job: LoadJob, key: bytes, e: Exception, corrupt: list[bytes]) -> None:
        self.stats.error("load_invalid")
        log.warning("kvtier: invalid block for %s (%s); recomputing", job.req_id, e)
        corrupt.append(key)

    def _drop(self, corrupt: list[bytes]) -> bool:
        """Useless to everyone: drop them so healthy copies can be stored again."""
        self.tier.delete_many(corrupt)
        return False

    def take_transfer_results(self) -> tuple[set[str], set[str]]:
        """(finished, failed) loads since the last call; failed ones are in both."""
        with self._results_lock:
            done, failed = self._finished, self._failed
            self._finished, self._failed = set(), set()
        return done, failed

    # -- saves ---------------------------------------------------------------
    def wait_for_save(self, meta: KVTierMetadata) -> None:
        if not meta.saves:
            return
        t0 = time.perf_counter()
        by_group: dict[int, list[BlockIO]] = defaultdict(list)
        for b in meta.saves:
            by_group[b.group_id].append(b)
        items: list[PutItem] = []
        # Parents before children: attention groups first (their blocks in order),
        # then the states that hang off them.
        for g in sorted(self.layout.groups, key=lambda g: g.kind is not GroupKind.ATTENTION):
            gid, ios = g.group_id, by_group.get(g.group_id)
            if not ios:
                continue
            if g.kind is GroupKind.ATTENTION:
                self.stats.tokens.labels("saved").inc(len(ios) * g.block_size)
            rows = self._kernels[gid].gather(self.views[gid], [b.block_id for b in ios])
            buf = rows.cpu().numpy()
            for i, b in enumerate(ios):
                key = self._key(gid, b.block_hash)
                parent = (self._key(b.parent_group, b.parent_hash).encode()
                          if b.parent_hash is not None and b.parent_group is not None else None)
                flags = payload.FLAG_DECODE if b.decode else 0
                items.append(PutItem(key.encode(),
                                     payload.encode(key, self.digests[gid], buf[i], flags),
                                     parent))
        with self._unsent_lock:
            self._unsent += len(items)
        try:
            self._queue.put_nowait(items)
        except queue.Full:
            with self._unsent_lock:
                self._unsent -= len(items)
            self.stats.error("save_queue_full", len(items))
        self.stats.latency.labels("save_gather").observe(time.perf_counter() - t0)

    def _upload_loop(self) -> None:
        while True:
            items = self._queue.get()
            if items is _STOP:
                return
            t0 = time.perf_counter()
            stored = self.upload_tier.put_many(items)
            self.stats.latency.labels("upload").observe(time.perf_counter() - t0)
            if stored is None:  # an outage (the guard logged it), not a refusal
                self.stats.error("save_tier_unavailable", len(items))
            else:
                self.stats.moved("saved", stored, sum(len(i.value) for i in items[:stored]))
                if stored < len(items):
                    self.stats.error("save_failed", len(items) - stored)
            with self._unsent_lock:
                self._unsent -= len(items)
            self._queue.task_done()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """At shutdown: give queued saves ``timeout_s`` to upload. Never between
        requests (production has no such step); a save a test needs is awaited
        from outside (``kvtier.testing.waits``). Says how many saves it drops."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        if done.wait(timeout_s):
            return True
        with self._unsent_lock:
            dropped = self._unsent
        log.warning("kvtier: %d queued block saves not uploaded after %.0fs at shutdown; "
                    "dropping them", dropped, timeout_s)
        self.stats.error("save_dropped_at_shutdown", dropped)
        return False

    def shutdown(self) -> None:
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        self.tier.close()
        self.upload_tier.close()

