"""What the scheduler side tells the worker side each step (pickled to workers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class BlockIO:
    """One block to move: which group, which paged block, under which stored key."""

    group_id: int
    block_id: int
    block_hash: bytes
    parent_hash: bytes | None = None  # hash of the block this one extends (saves only)
    parent_group: int | None = None
    decode: bool = False  # written by decode steps (see kvtier.payload.FLAG_DECODE)


@dataclass
class LoadJob:
    """One request's restore; no blocks means it cannot be loaded (report it failed)."""

    req_id: str
    blocks: list[BlockIO]


@dataclass
class KVTierMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[BlockIO] = field(default_factory=list)
    # Nothing else runs this step: load inline (no GIL contention with the engine loop).
    inline_loads: bool = False
