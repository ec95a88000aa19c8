"""Scheduler side of the connector: decides what to load and what to save.

Loads: on admission, one lookup asks the tier for the deepest boundary at which
every group (attention blocks *and* the recurrent state) can be restored; vLLM
is told exactly that many tokens. Loads are asynchronous: the request waits
(``WAITING_FOR_REMOTE_KVS``) while the worker fetches, validates and scatters,
and a failed load makes vLLM recompute the request from scratch -- the only
failure report vLLM accepts for hybrid models -- and it is not retried.

Saves: an attention block is saved in the step that fills it; a recurrent state
is saved in the step vLLM offers it (``boundary_state_offloads``, prefill and
decode boundaries alike). The worker copies them out at the end of that same
step, while the request still owns the blocks, so nothing needs pinning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtier.connectors.vllm.layout import CacheLayout
from kvtier.connectors.vllm.metadata import BlockIO, KVTierMetadata, LoadJob
from kvtier.connectors.vllm.stats import ConnectorStats

from kvtier.backends.base import PutItem
from kvtier.backends.guard import GuardedBackend
from kvtier.config import ConnectorConfig
from kvtier.keys import manifest_key
from kvtier.lookup import GroupKind, LookupQuery

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.connector")
_MANIFEST_CHECK_S = 5.0


@dataclass
class _ReqState:
    request: Request
    restored_tokens: int  # local + external hit at admission: nothing below is re-saved
    next_save: dict[int, int] = field(default_factory=dict)  # attention group -> block index
    saved_states: set[tuple[int, int]] = field(default_factory=set)  # (group, boundary tokens)


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, layout: CacheLayout, tier: GuardedBackend,
                 stats: ConnectorStats):
        self.cfg = cfg
        self.layout = layout
        self.tier = tier
        self.stats = stats
        stats.watch_tier("scheduler", tier)  # lookups: outages are exported, not misses
        self.ns = layout.namespace(cfg.tenant).id
        self._pending_hits: dict[str, tuple[int, int]] = {}  # req -> (local tokens, ext tokens)
        self._reqs: dict[str, _ReqState] = {}
        self._loads: list[LoadJob] = []
        self._manifest_written = False
        self._manifest_check_at = 0.0
        self._inflight_loads: set[str] = set()
        self._failed_loads: set[str] = set()

    def _write_manifest(self) -> None:
        """Best effort, once the tier answers and again whenever it lost the manifest
        (a restarted store comes back empty; checked every ``_MANIFEST_CHECK_S``): lets
        admin tools and waiting clients decode this namespace."""
        now = time.monotonic()
        if now < self._manifest_check_at or not self.tier.available:
            return
        self._manifest_check_at = now + _MANIFEST_CHECK_S
        key = manifest_key(self.ns)
        if self._manifest_written and self.tier.contains_many([key]) == [True]:
            return
        m = self.layout.manifest(self.cfg.tenant)
        self._manifest_written = bool(self.tier.put_many([PutItem(key, m.to_bytes())]))
        if not self._manifest_written:
            self._manifest_check_at = 0.0  # try again on the next lookup

    # -- admission -----------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed: int) -> tuple[int, bool]:
        ext, load_async = self._match(request, num_computed)
        self._request_checkpoint(request, num_computed + ext)
        return ext, load_async

    def _request_checkpoint(self, request: Request, position: int) -> None:
        """Make vLLM end the next prefill chunk at the next checkpoint boundary.

        vLLM writes a recurrent state only where a chunk ends; for one long
        prompt that is its last boundary. Moving the request's junction
        (``shared_prefix_boundary``, which the scheduler always stops a chunk at)
        to the next boundary after each chunk makes states appear every
        ``checkpoint_every`` boundaries, and the worker saves each of them.
        """
        if not self.cfg.checkpoint_every:
            return
        step = self.cfg.checkpoint_every * self.layout.scheduler_block_size
        target = (position // step + 1) * step
        if target >= request.num_prompt_tokens:
            return
        current = getattr(request, "shared_prefix_boundary", 0) or 0
        if position < current < target:
            return  # vLLM's own junction comes first; ours follows after it
        request.shared_prefix_boundary = target

    def _match(self, request: Request, num_computed: int) -> tuple[int, bool]:
        self._pending_hits[request.request_id] = (num_computed, 0)
        self._write_manifest()
        if request.request_id in self._failed_loads:
            self._failed_loads.discard(request.request_id)
            return 0, False  # its load just failed: recompute, don't try again
        if not self.cfg.load or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False
        S = self.layout.scheduler_block_size
        if num_computed % S:
            return 0, False
        max_boundary = (request.num_tokens - 1) // S  # vLLM must compute >= 1 token
        start = num_computed // S
        if max_boundary <= start:
            return 0, False
        query = LookupQuery(
            namespace=self.ns,
            rank=0,
            hashes=[bytes(h) for h in request.block_hashes],
            hashes_per_boundary=S // self.layout.hash_block_size,
            groups=self.layout.group_queries(),
            start_boundary=start,
            max_boundary=max_boundary,
        )
        result = self.tier.lookup(query)
        ext = max(0, result.boundary * S - num_computed)
        self.stats.lookup(ext > 0, result.reason.value if ext == 0 else "hit", ext)
        if ext:
            self._pending_hits[request.request_id] = (num_computed, ext)
        return ext, ext > 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        rid = request.request_id
        if num_external_tokens <= 0 and rid in self._reqs and rid not in self._pending_hits:
            return  # second call of an async load, once it has completed: keep the state
        local, _ = self._pending_hits.pop(rid, (request.num_computed_tokens, 0))
        restored = local + num_external_tokens
        st = _ReqState(request, restored)
        for g in self.layout.groups:
            if g.kind is GroupKind.ATTENTION:
                st.next_save[g.group_id] = restored // g.block_size
        self._reqs[rid] = st
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()
        hashes = request.block_hashes
        ios: list[BlockIO] = []
        ok = restored % self.layout.scheduler_block_size == 0
        for g in self.layout.groups:
            if g.kind is GroupKind.ATTENTION:
                idxs = range(local // g.block_size, restored // g.block_size)
            else:
                idxs = range(restored // g.block_size - 1, restored // g.block_size)
            for i in idxs:
                h = self.layout.block_hash(hashes, g, i)
                ids = block_ids[g.group_id]
                if h is None or i >= len(ids) or ids[i] == 0:
                    ok = False
                    continue
                ios.append(BlockIO(g.group_id, ids[i], h))
        if not ok:
            # Cannot describe the load exactly: fail it so vLLM recomputes.
            log.warning("kvtier: cannot map the %d-token load of %s; recomputing",
                        num_external_tokens, rid)
            ios = []
        self._loads.append(LoadJob(rid, ios))
        self._inflight_loads.add(rid)

    # -- per step ------------------------------------------------------------
    def build_connector_meta(self, out: SchedulerOutput) -> KVTierMetadata:
        meta = KVTierMetadata(loads=self._loads,
                              inline_loads=out.total_num_scheduled_tokens == 0)
        self._loads = []
        if not self.cfg.save:
            return meta
        gone = set(out.preempted_req_ids or ()) | set(out.finished_req_ids)
        for rid in gone:
            self._reqs.pop(rid, None)
        block_state = out.kv_connector_block_state
        if block_state is None:
            return meta
        # Recurrent states: the exact hand-offs vLLM offers (prefill checkpoints) ...
        for rid, entries in block_state.boundary_state_offloads.items():
            if rid not in gone:
                for gid, bid, boundary in entries:
                    self._save_state(meta, rid, gid, bid, boundary)
        for rid, n in out.num_scheduled_tokens.items():
            st = self._reqs.get(rid)
            if st is None or n <= 0:
                continue
            end = st.request.num_computed_tokens + n
            self._request_checkpoint(st.request, end)
            ids = block_state.get_block_ids(rid)
            if ids is not None:
                self._plan_step_saves(meta, rid, st, ids, end)
        return meta

    def _plan_step_saves(self, meta: KVTierMetadata, rid: str, st: _ReqState,
                         ids: tuple[list[int], ...], end: int) -> None:
        """Blocks this step fills (attention) and the state it ends on, if any."""
        req = st.request
        hashes = req.block_hashes
        for g in self.layout.groups:
            gids = ids[g.group_id]
            if g.kind is GroupKind.STATE:
                # ... and every step that ends exactly on a boundary, decode included:
                # the running state block (index boundary/block - 1) then holds that
                # boundary's state until the end of the step. vLLM offers no hand-off.
                idx = end // g.block_size - 1
                if end % g.block_size == 0 and idx < len(gids):
                    self._save_state(meta, rid, g.group_id, gids[idx], end)
                continue
            first = st.next_save[g.group_id]
            last = min(end // g.block_size, len(gids))
            for i in range(first, last):
                h = self.layout.block_hash(hashes, g, i)
                if h is None:
                    last = i
                    break
                decode = (i + 1) * g.block_size > req.num_prompt_tokens
                if gids[i] and (self.cfg.save_decode or not decode):
                    parent = self.layout.block_hash(hashes, g, i - 1) if i else None
                    meta.saves.append(BlockIO(g.group_id, gids[i], h, parent, g.group_id,
                                              decode))
            st.next_save[g.group_id] = max(first, last)

    def _save_state(self, meta: KVTierMetadata, rid: str, gid: int, bid: int,
                    boundary: int) -> None:
        st = self._reqs.get(rid)
        try:
            g = self.layout.group(gid)
        except KeyError:
            return
        if st is None or g.kind is not GroupKind.STATE or not bid or boundary % g.block_size:
            return
        if boundary <= st.restored_tokens or (gid, boundary) in st.saved_states:
            return  # restored from the tier or the local cache, or already saved
        hashes = st.request.block_hashes
        anchor = self.layout.anchor
        h = self.layout.block_hash(hashes, g, boundary // g.block_size - 1)
        ph = self.layout.block_hash(hashes, anchor, boundary // anchor.block_size - 1)
        if h is None or ph is None:
            return
        decode = boundary > st.request.num_prompt_tokens
        if decode and not self.cfg.save_decode:
            return
        st.saved_states.add((gid, boundary))
        meta.saves.append(BlockIO(gid, bid, h, ph, anchor.group_id, decode))

    def update_connector_output(self, finished_recving: set[str],
                                failed_recving: set[str]) -> None:
        self._inflight_loads.difference_update(finished_recving)
        for rid in failed_recving:
            self._inflight_loads.discard(rid)
            self._failed_loads.add(rid)
            self._reqs.pop(rid, None)  # it restarts from zero: nothing was restored

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._reqs.pop(rid, None)
        self._pending_hits.pop(rid, None)
        self._failed_loads.discard(rid)
        # A load still writing into this request's blocks keeps them until it reports.
        return rid in self._inflight_loads, None
