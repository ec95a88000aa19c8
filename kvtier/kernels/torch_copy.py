"""Reference copy path: gather paged blocks into a contiguous staging buffer and back.

A "block view" is one layer's KV tensor with its block dimension identified.
``gather`` packs the selected blocks of several layers into a ``[n, bytes]``
uint8 staging tensor (row = one stored payload body); ``scatter`` is its
inverse. On a GPU the Triton kernels in :mod:`kvtier.kernels.triton_copy` do
the same and are checked against this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockView:
    """One layer tensor (any dtype) whose dimension ``block_dim`` indexes blocks."""

    tensor: torch.Tensor
    block_dim: int = 0

    @property
    def block_shape(self) -> tuple[int, ...]:
        s = list(self.tensor.shape)
        del s[self.block_dim]
        return tuple(s)

    @property
    def block_nbytes(self) -> int:
        n = self.tensor.element_size()
        for d in self.block_shape:
            n *= d
        return n

    def describe(self) -> str:
        return f"{self.tensor.dtype}:{list(self.block_shape)}"


def row_bytes(views: Sequence[BlockView]) -> int:
    return sum(v.block_nbytes for v in views)


def check_rows(views: Sequence[BlockView], n: int, rows: torch.Tensor) -> None:
    """Staging rows must be ``[n, row_bytes(views)]`` uint8 (what :func:`gather` makes)."""
    if rows.shape != (n, row_bytes(views)) or rows.dtype != torch.uint8:
        raise ValueError(
            f"staging rows {tuple(rows.shape)}/{rows.dtype} do not match "
            f"{n} blocks of {row_bytes(views)} bytes"
        )


def gather(views: Sequence[BlockView], block_ids: Sequence[int]) -> torch.Tensor:
    """``[len(block_ids), row_bytes(views)]`` uint8 on CPU: the blocks, layer after layer."""
    n = len(block_ids)
    out = torch.empty((n, row_bytes(views)), dtype=torch.uint8)
    if n == 0:
        return out
    idx = torch.as_tensor(block_ids, dtype=torch.long, device=views[0].tensor.device)
    col = 0
    for v in views:
        picked = torch.index_select(v.tensor, v.block_dim, idx).movedim(v.block_dim, 0)
        flat = picked.contiguous().view(n, -1).view(torch.uint8).reshape(n, -1)
        out[:, col : col + v.block_nbytes].copy_(flat)
        col += v.block_nbytes
    return out


def scatter(views: Sequence[BlockView], block_ids: Sequence[int], rows: torch.Tensor) -> None:
    """Write staging ``rows`` (as produced by :func:`gather`) into the blocks ``block_ids``."""
    n = len(block_ids)
    if n == 0:
        return
    check_rows(views, n, rows)
    idx = torch.as_tensor(block_ids, dtype=torch.long, device=views[0].tensor.device)
    col = 0
    for v in views:
        part = rows[:, col : col + v.block_nbytes].contiguous()
        src = part.view(v.tensor.dtype).reshape(n, *v.block_shape).to(v.tensor.device)
        v.tensor.index_copy_(v.block_dim, idx, src.movedim(0, v.block_dim))
        col += v.block_nbytes
