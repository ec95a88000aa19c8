"""Scheduler side of the connector: decides what to load and what to save.

Loads: on admission, one lookup asks the tier for the deepest boundary at which
every group (attention blocks *and* the recurrent state) can be restored; vLLM
is told exactly that many tokens. Loads are asynchronous: the request waits
(``WAITING_FOR_REMOTE_KVS``) while the worker fetches, validates and scatters,
and a failed load makes vLLM recompute the request from scratch -- the only
failure report vLLM accepts for hybrid models -- and it is not retried.

Saves: an attention block is saved in the step that fills it; a recurrent state
is saved in the step vLLM offers it (``boundary_state_offloads``, prefill and
decode boundaries alike) if the admission policy (:mod:`kvtier.admission`)
admits it; the policy also says where a prefill chunk must end so that a state
exists at all. The default moves no chunk end unless the tier's lookup revealed a
fleet junction (attention blocks shared past the restorable boundary: another
request ran this prefix and left it there), so on a miss vLLM's scheduling and
tokens are exactly those of an engine without the connector. The worker copies
saves out at the end of that same step, while the request still owns the
blocks, so nothing needs pinning.

PD hand-offs (:mod:`.handoff`): a prefill asked for by a router stops one token
short and saves the tail past its last full block; a decode request carrying the
prefill's params waits for that tail (vLLM re-asks while we answer ``None``) and
restores ``N - 1`` tokens, or falls back to the prefix lookup at its deadline.

Speculative decoding: a verify step's scheduled tokens include drafts that may
be rejected, so the connector saves nothing a draft position reaches: no state
because a step *ends* on a boundary, no attention block past the step's non-draft
tokens. A decode-crossed state is saved only from vLLM's offer, which it makes
from committed tokens (``cache_blocks`` after rejection) for the block its align
postprocess copies the boundary's state into; with drafts the worker saves after
that postprocess (vLLM defers ``wait_for_save`` past sampling). A boundary the
accepted tokens run past mid-step is not offered (vLLM frees that block first),
so it is not saved: slower, never wrong.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtier.connectors.vllm import handoff
from kvtier.connectors.vllm.handoff import HandoffWait
from kvtier.connectors.vllm.layout import CacheLayout, GroupLayout
from kvtier.connectors.vllm.metadata import BlockIO, KVTierMetadata, LoadJob
from kvtier.connectors.vllm.stats import ConnectorStats

from kvtier.admission import RequestView
from kvtier.backends.base import PutItem
from kvtier.backends.guard import GuardedBackend
from kvtier.config import ConnectorConfig
from kvtier.keys import BlockKey, manifest_key
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
                 stats: ConnectorStats, kv_role: str | None = "kv_both"):
        self.cfg = cfg
        # kv_consumer (a PD decode node) saves only what its own decode produces.
        self.save_prompt = cfg.save and kv_role != "kv_consumer"
        self.save_decoded = cfg.save and cfg.save_decode
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
        self._waits: dict[str, HandoffWait] = {}  # decode requests expecting a hand-off
        self._handoffs: dict[str, tuple[int, bytes]] = {}  # prefill req -> (tokens, id) saved
        self.policy = cfg.admission_policy()
        self._views: dict[str, RequestView] = {}  # req -> what the policy sees of it

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
    def on_new_request(self, request: Request) -> None:
        """A PD prefill stops one token short, like vLLM's NixlConnector: the decode
        node needs the recurrent state at ``N - 1`` to compute the last token itself."""
        params = request.kv_transfer_params
        if (not handoff.is_prefill_request(params) or not self.save_prompt
                or params.get("_kvtier_truncated") or request.num_prompt_tokens < 2
                or request.prompt_token_ids is None
                or getattr(request, "skip_reading_prefix_cache", False)):
            return
        del request.prompt_token_ids[-1:]
        del request._all_token_ids[-1:]
        request.num_prompt_tokens -= 1
        del request.block_hashes[request.num_prompt_tokens // self.layout.hash_block_size:]
        request.max_tokens = 1
        params["_kvtier_truncated"] = True

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed: int) -> tuple[int | None, bool]:
        ext = self._match_handoff(request, num_computed)
        if ext is None:
            return None, False  # hand-off announced but not in the tier yet: ask again
        if ext:
            return ext, True
        ext, load_async, junction = self._match(request, num_computed)
        self._views[request.request_id] = self._view(request, num_computed + ext if ext else 0,
                                                     junction)
        self._request_checkpoint(request, num_computed + ext)
        return ext, load_async

    def _view(self, request: Request, hit_tokens: int = 0,
              junction: int | None = None) -> RequestView:
        """What the admission policy sees of ``request``. ``in_chunk_checkpoints`` is
        False: vLLM 0.32 writes a state inside a chunk only at the prompt's last aligned
        position (Mamba2, KDA), where align mode stops anyway, and GDN never does."""
        return RequestView(
            num_prompt_tokens=request.num_prompt_tokens,
            boundary_tokens=self.layout.scheduler_block_size,
            hit_boundary=hit_tokens // self.layout.scheduler_block_size,
            junctions=(junction,) if junction else (),
            is_pd_prefill=handoff.is_prefill_request(request.kv_transfer_params),
            state_bytes_per_boundary=self.layout.state_bytes_per_boundary,
            kv_bytes_per_token=self.layout.kv_bytes_per_token,
            in_chunk_checkpoints=False,
        )

    def _view_of(self, request: Request) -> RequestView:
        view = self._views.get(request.request_id)
        if view is None:
            view = self._views[request.request_id] = self._view(request)
        return view

    def _match_handoff(self, request: Request, num_computed: int) -> int | None:
        """Tokens of an announced PD hand-off to load, None to wait for its upload,
        0 when there is none (or it did not arrive in time: the prefix lookup decides)."""
        rid = request.request_id
        w = self._waits.get(rid)
        if w is None:
            if not self.cfg.load or rid in self._failed_loads:
                return 0
            tokens = handoff.expected_tokens(request.kv_transfer_params,
                                             request.num_prompt_tokens)
            if tokens is None:
                return 0
            w = self._waits[rid] = HandoffWait.start(tokens, self.cfg.handoff_wait_s)
        if w.done or w.tokens <= num_computed:
            return 0
        if not w.should_poll(self.cfg.handoff_poll_s):
            return None
        plan = self._restore_plan(request, num_computed, w.tokens)
        keys = [BlockKey(self.ns, 0, g.group_id, h).encode() for g, _, h in plan if h]
        if len(keys) == len(plan) and all(self.tier.contains_many(keys)):
            w.done = True
            ext = w.tokens - num_computed
            self._pending_hits[rid] = (num_computed, ext)
            self.stats.lookup(True, "handoff", ext)
            self.stats.add("handoff_hits")
            self.stats.add("handoff_tokens", ext)
            return ext
        if not self.tier.available or w.expired:
            w.done = True
            self.stats.error("handoff_unavailable" if not self.tier.available
                             else "handoff_timeout")
            log.warning("kvtier: hand-off of %d tokens for %s %s; falling back to the prefix "
                        "cache", w.tokens, rid,
                        "unreachable (tier down)" if not self.tier.available else
                        f"not in the tier after {self.cfg.handoff_wait_s:.1f}s")
            return 0
        return None

    def _restore_plan(self, request: Request, start: int, end: int
                      ) -> list[tuple[GroupLayout, int, bytes | None]]:
        """(group, block index, stored hash) of every block that restores tokens
        ``[start, end)``: attention blocks from ``start`` and each state group's block at
        ``end``. Past the last full block the hash is the hand-off tail's content key."""
        hashes = request.block_hashes
        tail = (handoff.tail_hash(hashes, request.all_token_ids, end, self.layout.hash_block_size)
                if end % self.layout.scheduler_block_size else None)
        plan: list[tuple[GroupLayout, int, bytes | None]] = []
        for g in self.layout.groups:
            bs = g.block_size
            if g.kind is GroupKind.ATTENTION:
                for i in range(start // bs, -(-end // bs)):
                    full = (i + 1) * bs <= end
                    plan.append((g, i, self.layout.block_hash(hashes, g, i) if full else tail))
            else:
                i = (end - 1) // bs
                plan.append((g, i, tail if end % bs else self.layout.block_hash(hashes, g, i)))
        return plan

    def _request_checkpoint(self, request: Request, position: int) -> None:
        """Make vLLM end the next prefill chunk where the admission policy wants a state.

        vLLM writes a recurrent state only where a chunk ends; for one long prompt
        that is its last boundary. Moving the request's junction
        (``shared_prefix_boundary``, which the scheduler always stops a chunk at) to
        the policy's next chunk end makes a state appear there, and the worker saves
        it. A policy answering None (the default on a miss) leaves vLLM's scheduling,
        and so its arithmetic, untouched.
        """
        view = self._view_of(request)
        if view.is_pd_prefill:
            return  # a PD prefill keeps vLLM's own chunking: its hand-off is then exact
        target = self.policy.chunk_end(view, position)
        if target is None or not position < target < request.num_prompt_tokens:
            return
        current = getattr(request, "shared_prefix_boundary", 0) or 0
        if position < current < target:
            return  # vLLM's own junction comes first; ours follows after it
        request.shared_prefix_boundary = target

    def _match(self, request: Request, num_computed: int) -> tuple[int, bool, int | None]:
        """(tokens to load, load async, fleet junction boundary or None)."""
        self._pending_hits[request.request_id] = (num_computed, 0)
        self._write_manifest()
        if request.request_id in self._failed_loads:
            self._failed_loads.discard(request.request_id)
            return 0, False, None  # its load just failed: recompute, don't try again
        if not self.cfg.load or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False, None
        S = self.layout.scheduler_block_size
        if num_computed % S:
            return 0, False, None
        max_boundary = (request.num_tokens - 1) // S  # vLLM must compute >= 1 token
        start = num_computed // S
        if max_boundary <= start:
            return 0, False, None
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
        if result.junction:
            self.stats.add("junction_hints")
        return ext, ext > 0, result.junction

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
        ios: list[BlockIO] = []
        ok = True
        for g, i, h in self._restore_plan(request, local, restored):
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
        if not (self.save_prompt or self.save_decoded):
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
                drafts = len(out.scheduled_spec_decode_tokens.get(rid, ()))
                self._plan_step_saves(meta, rid, st, ids, end, drafts)
                if (end >= st.request.num_prompt_tokens and rid not in self._handoffs
                        and handoff.is_prefill_request(st.request.kv_transfer_params)
                        and self.save_prompt):
                    self._plan_handoff_saves(meta, rid, st, ids)
        if meta.saves:  # with the worker's saved/failed counts: "every save has landed"
            self.stats.add("save_blocks_planned", len(meta.saves))
        return meta

    def _plan_handoff_saves(self, meta: KVTierMetadata, rid: str, st: _ReqState,
                            ids: tuple[list[int], ...]) -> None:
        """The step that ends a PD prefill: save the tail past the last full block
        (partial attention blocks and every state at the prompt's end)."""
        req = st.request
        end = req.num_prompt_tokens
        tail = handoff.tail_hash(req.block_hashes, req.all_token_ids, end,
                                 self.layout.hash_block_size)
        saves: list[BlockIO] = []
        if end % self.layout.scheduler_block_size:
            anchor = self.layout.anchor
            a_idx = (end - 1) // anchor.block_size
            a_hash = (tail if end % anchor.block_size
                      else self.layout.block_hash(req.block_hashes, anchor, a_idx))
            for g, i, h in self._restore_plan(req, end - end % self.layout.scheduler_block_size,
                                              end):
                if h != tail:
                    continue  # a full block: the prefix path saves it
                if i >= len(ids[g.group_id]) or not ids[g.group_id][i]:
                    log.warning("kvtier: hand-off of %s has no block %d in group %d; "
                                "decode will use the prefix cache", rid, i, g.group_id)
                    return
                if g.kind is GroupKind.ATTENTION:
                    parent = self.layout.block_hash(req.block_hashes, g, i - 1) if i else None
                    saves.append(BlockIO(g.group_id, ids[g.group_id][i], h, parent, g.group_id))
                else:
                    saves.append(BlockIO(g.group_id, ids[g.group_id][i], h, a_hash,
                                         anchor.group_id))
        meta.saves.extend(saves)
        self._handoffs[rid] = (end, tail)
        self.stats.add("handoffs_saved")

    def _plan_step_saves(self, meta: KVTierMetadata, rid: str, st: _ReqState,
                         ids: tuple[list[int], ...], end: int, drafts: int = 0) -> None:
        """Blocks this step fills (attention) and the state it ends on, if any.

        ``drafts`` of the step's tokens are speculative: attention stops before them,
        and a step with drafts ends on no state (its state block holds the state after
        its first token, the boundary only once accepted; vLLM offers it then).
        """
        req = st.request
        hashes = req.block_hashes
        for g in self.layout.groups:
            gids = ids[g.group_id]
            if g.kind is GroupKind.STATE:
                # ... and every step that ends exactly on a boundary, decode included:
                # the running state block (index boundary/block - 1) then holds that
                # boundary's state until the end of the step. vLLM offers no hand-off.
                idx = end // g.block_size - 1
                if not drafts and end % g.block_size == 0 and idx < len(gids):
                    self._save_state(meta, rid, g.group_id, gids[idx], end)
                continue
            first = st.next_save[g.group_id]
            last = min((end - drafts) // g.block_size, len(gids))
            for i in range(first, last):
                h = self.layout.block_hash(hashes, g, i)
                if h is None:
                    last = i
                    break
                decode = (i + 1) * g.block_size > req.num_prompt_tokens
                if gids[i] and (self.save_decoded if decode else self.save_prompt):
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
        if not (self.save_decoded if decode else self.save_prompt):
            return
        if not self._admit(st.request, boundary, decode):
            return
        st.saved_states.add((gid, boundary))
        meta.saves.append(BlockIO(gid, bid, h, ph, anchor.group_id, decode))

    def _admit(self, request: Request, boundary: int, decode: bool) -> bool:
        """The policy's verdict on the state at ``boundary`` tokens; a PD prefill's state
        at its (truncated) prompt end is its hand-off and always saved."""
        view = self._view_of(request)
        ok = (view.is_pd_prefill and boundary == request.num_prompt_tokens) or \
            self.policy.admit_state(view, boundary // self.layout.scheduler_block_size, decode)
        self.stats.add("states_admitted" if ok else "states_declined")
        return ok

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
        self._waits.pop(rid, None)
        self._views.pop(rid, None)
        done = self._handoffs.pop(rid, None)
        params = None
        if done is not None:  # PD prefill: tell the router (and decode) what the tier holds
            params = handoff.prefill_params(done[0], done[1], self.ns.hex())
        # A load still writing into this request's blocks keeps them until it reports.
        return rid in self._inflight_loads, params
