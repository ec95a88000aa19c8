"""What the connector derives from vLLM's KV-cache config, identically on both sides.

The scheduler and the worker each build a :class:`CacheLayout` from the
``kv_cache_config`` vLLM hands them (never from ``cache_config``, whose
block sizes can disagree with the workers'). Its fingerprint is the layout
part of every key's namespace, with the engine's prefix-hash seed (hashed):
engines seeded differently compute different block hashes, so they must not
believe they share a key space.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtier.hashing import RANDOM, HashSeed, engine_hash_seed
from kvtier.keys import Namespace, fingerprint
from kvtier.lookup import GroupKind, GroupQuery
from kvtier.manifest import GroupInfo, NamespaceManifest

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvtier.connector")


@dataclass(frozen=True)
class GroupLayout:
    group_id: int
    kind: GroupKind
    block_size: int
    layer_names: tuple[str, ...]
    spec: dict[str, Any]


class UnsupportedLayout(ValueError):
    """A KV-cache structure kvtier cannot store faithfully (the connector then stays idle)."""


def _describe_spec(spec: Any) -> tuple[GroupKind, dict[str, Any]]:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    name = type(spec).__name__
    base = {"type": name, "block_size": spec.block_size, "page": spec.page_size_bytes}
    if isinstance(spec, MambaSpec):
        base.update(
            shapes=[list(s) for s in spec.shapes],
            dtypes=[str(d) for d in spec.dtypes],
            mamba_type=str(spec.mamba_type),
            mode=spec.mamba_cache_mode,
        )
        if spec.mamba_cache_mode != "align":
            raise UnsupportedLayout(
                "recurrent groups need --mamba-cache-mode align (states are only "
                "written at block boundaries in that mode)"
            )
        return GroupKind.STATE, base
    if type(spec) is FullAttentionSpec or (
        isinstance(spec, FullAttentionSpec) and getattr(spec, "sliding_window", None) is None
    ):
        base.update(
            heads=spec.num_kv_heads,
            head=spec.head_size,
            head_v=spec.head_size_v,
            dtype=str(spec.dtype),
        )
        return GroupKind.ATTENTION, base
    raise UnsupportedLayout(f"KV-cache spec {name} is not supported by kvtier yet")


@dataclass(frozen=True)
class CacheLayout:
    groups: tuple[GroupLayout, ...]
    scheduler_block_size: int  # tokens between restorable boundaries (LCM of group sizes)
    hash_block_size: int  # granularity of Request.block_hashes
    fingerprint: str
    model: str
    tp_size: int
    hash_algo: str
    hash_seed: HashSeed
    unseeded: str  # the fingerprint without the hash seed (tells a seed mismatch apart)

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig,
                  model_id: str | None = None) -> CacheLayout:
        cacheable = set(kv_cache_config.prefix_cacheable_group_ids)
        groups = []
        for gid, g in enumerate(kv_cache_config.kv_cache_groups):
            if gid not in cacheable:
                continue
            kind, spec = _describe_spec(g.kv_cache_spec)
            groups.append(GroupLayout(gid, kind, g.kv_cache_spec.block_size,
                                      tuple(g.layer_names), spec))
        if not any(g.kind is GroupKind.ATTENTION for g in groups):
            raise UnsupportedLayout("no full-attention group to anchor prefixes on")
        sizes = [g.block_size for g in groups]
        sched_bs = math.lcm(*sizes)
        hash_bs = kv_cache_config.hash_block_size or math.gcd(*sizes)
        for g in groups:
            if g.block_size % hash_bs:
                raise UnsupportedLayout(f"group {g.group_id} block size not a multiple of hashes")
            if g.kind is GroupKind.STATE and g.block_size != sched_bs:
                raise UnsupportedLayout("state groups must use the scheduler block size")
        tp = vllm_config.parallel_config.tensor_parallel_size
        model = model_id or vllm_config.model_config.model
        desc = {
            "groups": [{"id": g.group_id, "layers": list(g.layer_names), **g.spec} for g in groups],
            "tp": tp,
            "pp": vllm_config.parallel_config.pipeline_parallel_size,
            "hash_algo": vllm_config.cache_config.prefix_caching_hash_algo,
            "hash_bs": hash_bs,
        }
        seed = engine_hash_seed(str(desc["hash_algo"]))
        if seed.source == RANDOM:
            log.warning("kvtier: vLLM seeds the prefix hash with %s: no other engine can "
                        "share this one's blocks; set PYTHONHASHSEED the same on every node",
                        seed.describe())
        return cls(tuple(groups), sched_bs, hash_bs, fingerprint({**desc, "seed": seed.digest}),
                   model, tp, str(desc["hash_algo"]), seed, fingerprint(desc))

    def manifest(self, tenant: str = "") -> NamespaceManifest:
        return NamespaceManifest(
            namespace=self.namespace(tenant).hex, model=self.model, layout=self.fingerprint,
            groups=[GroupInfo(g.group_id, g.kind.value, g.block_size, len(g.layer_names))
                    for g in self.groups],
            boundary_tokens=self.scheduler_block_size, hash_block_size=self.hash_block_size,
            hash_algo=self.hash_algo, tp_size=self.tp_size, tenant_salted=bool(tenant),
            hash_seed_source=self.hash_seed.source, hash_seed=self.hash_seed.seed,
            hash_seed_digest=self.hash_seed.digest, layout_unseeded=self.unseeded)

    def namespace(self, tenant: str = "") -> Namespace:
        return Namespace(self.model, self.fingerprint, tenant)

    def group(self, gid: int) -> GroupLayout:
        for g in self.groups:
            if g.group_id == gid:
                return g
        raise KeyError(gid)

    @property
    def anchor(self) -> GroupLayout:
        """The attention group that recurrent states hang off (their eviction parent)."""
        return next(g for g in self.groups if g.kind is GroupKind.ATTENTION)

    @property
    def state_bytes_per_boundary(self) -> int:
        """Bytes of every recurrent group's state at one boundary (what admission weighs)."""
        return sum(g.spec["page"] * len(g.layer_names) for g in self.groups
                   if g.kind is GroupKind.STATE)

    @property
    def kv_bytes_per_token(self) -> int:
        """Attention KV bytes per token, all attention groups."""
        return sum(g.spec["page"] * len(g.layer_names) // g.block_size for g in self.groups
                   if g.kind is GroupKind.ATTENTION)

    def group_queries(self) -> list[GroupQuery]:
        return [GroupQuery(g.group_id, g.kind, g.block_size // self.hash_block_size)
                for g in self.groups]

    def block_hash(self, hashes: Any, group: GroupLayout, block_index: int) -> bytes | None:
        """Hash closing ``block_index`` of ``group`` (None if that block is not full yet)."""
        per = group.block_size // self.hash_block_size
        i = (block_index + 1) * per - 1
        return bytes(hashes[i]) if 0 <= i < len(hashes) else None
