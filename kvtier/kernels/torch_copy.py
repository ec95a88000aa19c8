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


# Above this many bytes per block, one ``copy_`` per block beats torch's indexed
# copies on CPU (``index_copy_`` on byte rows ran ~17x slower than memcpy here).
_PER_BLOCK_BYTES = 4096


def _per_block(v: BlockView, first: int) -> bool:
    """Copy block by block: big blocks that are contiguous byte runs of a CPU tensor."""
    return (v.block_nbytes >= _PER_BLOCK_BYTES and v.tensor.device.type == "cpu"
            and v.tensor.select(v.block_dim, first).is_contiguous())


def _block_bytes(v: BlockView, i: int) -> torch.Tensor:
    return v.tensor.select(v.block_dim, i).reshape(-1).view(torch.uint8)


def gather(views: Sequence[BlockView], block_ids: Sequence[int],
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``[len(block_ids), row_bytes(views)]`` uint8 on CPU: the blocks, layer after layer.

    ``out`` (the same shape) is reused when given: a fresh buffer costs its page
    faults, which on CPU are most of a gather's time.
    """
    n = len(block_ids)
    if out is None:
        out = torch.empty((n, row_bytes(views)), dtype=torch.uint8)
    else:
        check_rows(views, n, out)
    if n == 0:
        return out
    ids = [int(i) for i in block_ids]
    col = 0
    for v in views:
        if _per_block(v, ids[0]):
            for j, i in enumerate(ids):
                out[j, col : col + v.block_nbytes].copy_(_block_bytes(v, i))
        else:
            idx = torch.as_tensor(ids, dtype=torch.long, device=v.tensor.device)
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
    ids = [int(i) for i in block_ids]
    col = 0
    for v in views:
        if _per_block(v, ids[0]):
            for j, i in enumerate(ids):
                _block_bytes(v, i).copy_(rows[j, col : col + v.block_nbytes])
        else:
            idx = torch.as_tensor(ids, dtype=torch.long, device=v.tensor.device)
            part = rows[:, col : col + v.block_nbytes].contiguous()
            src = part.view(v.tensor.dtype).reshape(n, *v.block_shape).to(v.tensor.device)
            v.tensor.index_copy_(v.block_dim, idx, src.movedim(0, v.block_dim))
        col += v.block_nbytes
