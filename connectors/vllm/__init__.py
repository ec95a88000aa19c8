"""``KVTierConnector``: vLLM KV connector for hybrid (Mamba/GDN + attention) models.

Load with::

    --kv-transfer-config '{"kv_connector": "KVTierConnector",
      "kv_connector_module_path": "kvtier.connectors.vllm", "kv_role": "kv_both",
      "kv_connector_extra_config": {"tier_url": "grpc://127.0.0.1:7070"}}'

Requires ``--enable-prefix-caching --mamba-cache-mode align``. This class only
wires vLLM's interface to :mod:`.scheduler` and :mod:`.worker`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvtier.connectors.vllm.layout import CacheLayout, UnsupportedLayout
from kvtier.connectors.vllm.metadata import KVTierMetadata
from kvtier.connectors.vllm.scheduler import SchedulerSide
from kvtier.connectors.vllm.stats import ConnectorStats
from kvtier.connectors.vllm.worker import WorkerSide
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvtier.backends.guard import GuardedBackend
from kvtier.config import ConnectorConfig, load_config

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KVTierConnector", "KVTierMetadata"]
log = logging.getLogger("kvtier.connector")


def _route_logs_to_vllm() -> None:
    """kvtier's own loggers print through vLLM's handlers (same format, same place)."""
    kv = logging.getLogger("kvtier")
    if kv.handlers:
        return
    for h in logging.getLogger("vllm").handlers:
        kv.addHandler(h)
    kv.setLevel(logging.INFO)
    kv.propagate = False


class KVTierConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.cfg: ConnectorConfig = load_config(ConnectorConfig, extra)
        # A failed load must mean "recompute", never "fail the request".
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            object.__setattr__(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        self.stats = ConnectorStats.for_process()
        self._metrics_checked = False
        _route_logs_to_vllm()
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        try:
            self.layout: CacheLayout | None = CacheLayout.from_vllm(
                vllm_config, kv_cache_config, self.cfg.model_id)
        except UnsupportedLayout as e:
            log.warning("kvtier connector idle: %s", e)
            self.layout = None
            return
        def guarded() -> GuardedBackend:  # TLS and token options reach gRPC tiers
            return GuardedBackend(self.cfg.tier_url, self.cfg.timeout_s, self.cfg.retry_after_s,
                                  options=self.cfg.tier_options())

        tier = guarded()
        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(self.cfg, self.layout, tier, self.stats,
                                        self._kv_transfer_config.kv_role)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            try:
                rank = get_tensor_model_parallel_rank()
            except Exception:  # noqa: BLE001 - no TP group outside a worker
                rank = 0
            upload = guarded()
            self._worker = WorkerSide(self.cfg, self.layout, tier, upload, self.stats, rank,
                                      kv_cache_config.num_blocks)
        if self.cfg.metrics_port is not None and role == KVConnectorRole.SCHEDULER:
            self.stats.serve(self.cfg.metrics_port)
        log.info("kvtier connector (%s) on %s, namespace %s, boundary every %d tokens",
                 role.name.lower(), self.cfg.tier_url,
                 self.layout.namespace(self.cfg.tenant).hex, self.layout.scheduler_block_size)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # -- worker side ---------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._worker is not None:
            self._worker.register_kv_caches(kv_caches)

    def _serve_worker_metrics(self) -> None:
        """A worker in its own process serves on metrics_port + 1 + rank; one that shares
        the scheduler's process (which started first by now) shares its endpoint."""
        if self.cfg.metrics_port is None or self._worker is None or self._metrics_checked:
            return
        self._metrics_checked = True
        if ConnectorStats._served_port is None:
            self.stats.serve(self.cfg.metrics_port + 1 + self._worker.rank)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._serve_worker_metrics()
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KVTierMetadata):
            self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are asynchronous: the request runs only once they completed

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return None  # saved per step in wait_for_save (GDN layers never call this)

    def wait_for_save(self) -> None:
        if self._worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if isinstance(meta, KVTierMetadata):
            self._worker.wait_for_save(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self._worker is None:
            return KVConnectorTransferResults()
        done, failed = self._worker.take_transfer_results()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self.get_transfer_results(finished_req_ids).finished_recving or None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._sched is not None:
            self._sched.update_connector_output(set(connector_output.finished_recving or ()),
                                                set(connector_output.failed_recving or ()))

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # -- scheduler side ------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        if self._sched is not None:
            self._sched.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._sched is None:
            return 0, False
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if self._sched is not None:
            self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        if self._sched is None:
            return KVTierMetadata()
        return self._sched.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        if self._sched is None:
            return False, None
        return self._sched.request_finished(request)
