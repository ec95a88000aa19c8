"""Block copy kernels: Triton on GPUs, torch (the reference) elsewhere.

The path is chosen per KV-cache group at registration, from the group's real
tensors: a layout the Triton kernels cannot copy (per-block bytes not
contiguous, block dim past 1) gets the torch path instead of an error inside
vLLM's step. A Triton failure at call time (no driver, a compile error) also
falls back to torch for good: at worst slower, never a crashed engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import ModuleType

import torch

from kvtier.kernels import torch_copy
from kvtier.kernels.torch_copy import BlockView, Buffer

log = logging.getLogger("kvtier.connector")


class CopyPath:
    """``gather``/``scatter`` for one group's views, falling back to torch on failure."""

    def __init__(self, impl: ModuleType, label: str) -> None:
        self._impl = impl
        self.label = label

    @property
    def name(self) -> str:
        return "torch" if self._impl is torch_copy else "triton"

    def _fall_back(self, e: Exception) -> None:
        log.warning("kvtier: Triton copy failed for %s (%s: %s); using the torch path from now on",
                    self.label, type(e).__name__, e)
        self._impl = torch_copy

    def gather(self, views: Sequence[BlockView], block_ids: Sequence[int]) -> torch.Tensor:
        if self._impl is not torch_copy:
            try:
                return self._impl.gather(views, block_ids)
            except Exception as e:  # noqa: BLE001 - any Triton failure: the reference is correct
                self._fall_back(e)
        return torch_copy.gather(views, block_ids)

    def scatter(self, views: Sequence[BlockView], block_ids: Sequence[int],
                rows: torch.Tensor | Sequence[Buffer]) -> None:
        """``rows``: a staging tensor or one byte buffer per block (torch copies those
        straight into CPU blocks; Triton needs them joined into one tensor)."""
        # A failed Triton scatter may have written some rows: torch rewrites every one.
        if self._impl is not torch_copy:
            if not isinstance(rows, torch.Tensor):
                rows = torch_copy.stack_rows(views, len(block_ids), rows)
            try:
                return self._impl.scatter(views, block_ids, rows)
            except Exception as e:  # noqa: BLE001
                self._fall_back(e)
        torch_copy.scatter(views, block_ids, rows)


def triton_unsupported(views: Sequence[BlockView]) -> str | None:
    """Why the Triton kernels cannot copy ``views`` (None: they can)."""
    try:
        from kvtier.kernels import triton_copy
    except ImportError:
        return "Triton is not installed"
    for i, v in enumerate(views):
        try:
            triton_copy.chunks(v)
        except ValueError as e:
            return f"view {i} {v.describe()} (block dim {v.block_dim}): {e}"
    return None


def select(views: Sequence[BlockView], device: torch.device | str | None = None,
           label: str = "group") -> CopyPath:
    """The copy path for one group's ``views`` on ``device`` (default: the views' own)."""
    if device is None:
        device = views[0].tensor.device if views else "cpu"
    why = "not on CUDA" if torch.device(device).type != "cuda" else triton_unsupported(views)
    if why is None:
        from kvtier.kernels import triton_copy

        path = CopyPath(triton_copy, label)
        log.info("kvtier: %s copies with Triton", label)
    else:
        path = CopyPath(torch_copy, label)
        runs = sum(torch_copy.byte_run(v) is not None for v in views)
        log.info("kvtier: %s copies with torch (%s; %d of %d views as byte runs)",
                 label, why, runs, len(views))
    return path
