"""Triton gather/scatter of paged KV blocks to and from a contiguous staging buffer.

Same contract as :mod:`kvtier.kernels.torch_copy` (the reference): row ``i`` of
the ``[n, row_bytes]`` uint8 staging tensor holds block ``block_ids[i]`` of every
layer, layer after layer. Each layer's per-block bytes must be contiguous
chunks (block dim 0, or a leading K/V dim before the block dim); each chunk
is one 2-D launch, ``(blocks, tiles)``, copying in the widest word that all
sizes and strides allow. Runs on GPU tensors, or on CPU under
``TRITON_INTERPRET=1`` (how the tests check it here, where there is no GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvtier.kernels.torch_copy import BlockView, check_rows, row_bytes

TILE = 1024


@triton.jit
def _gather_kernel(src, dst, ids, src_block_stride, src_offset, dst_row_stride, dst_col, nwords,
                   TILE: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    bid = tl.load(ids + i).to(tl.int64)
    offs = j * TILE + tl.arange(0, TILE)
    mask = offs < nwords
    v = tl.load(src + src_offset + bid * src_block_stride + offs, mask=mask)
    tl.store(dst + i.to(tl.int64) * dst_row_stride + dst_col + offs, v, mask=mask)


@triton.jit
def _scatter_kernel(src, dst, ids, dst_block_stride, dst_offset, src_row_stride, src_col, nwords,
                    TILE: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    bid = tl.load(ids + i).to(tl.int64)
    offs = j * TILE + tl.arange(0, TILE)
    mask = offs < nwords
    v = tl.load(src + i.to(tl.int64) * src_row_stride + src_col + offs, mask=mask)
    tl.store(dst + dst_offset + bid * dst_block_stride + offs, v, mask=mask)


@dataclass(frozen=True)
class _Chunk:
    base: torch.Tensor  # uint8 view of the whole layer tensor's storage region
    offset: int  # bytes from base to this chunk in block 0
    block_stride: int  # bytes between consecutive blocks
    nbytes: int


def chunks(v: BlockView) -> list[_Chunk]:
    t = v.tensor
    es = t.element_size()
    inner = t.shape[v.block_dim + 1:]
    inner_stride = t.stride()[v.block_dim + 1:]
    expect = 1
    for d, s in zip(reversed(inner), reversed(inner_stride)):
        if d != 1 and s != expect:
            raise ValueError("per-block bytes are not contiguous; use the torch path")
        expect *= d
    nbytes = expect * es
    base = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), 0, (t.untyped_storage().nbytes(),), (1,))
    first = t.storage_offset() * es
    if v.block_dim == 0:
        return [_Chunk(base, first, t.stride(0) * es, nbytes)]
    if v.block_dim == 1:
        return [_Chunk(base, first + k * t.stride(0) * es, t.stride(1) * es, nbytes)
                for k in range(t.shape[0])]
    raise ValueError("block dim must be 0 or 1 for the Triton path")


def _word(*sizes: int) -> torch.dtype:
    for dt, w in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if all(s % w == 0 for s in sizes):
            return dt
    return torch.uint8


def _plan(views: Sequence[BlockView], n: int):
    rb = row_bytes(views)
    col = 0
    for v in views:
        for c in chunks(v):
            yield c, col, rb
            col += c.nbytes


def gather(views: Sequence[BlockView], block_ids: Sequence[int]) -> torch.Tensor:
    n = len(block_ids)
    dev = views[0].tensor.device
    out = torch.empty((n, row_bytes(views)), dtype=torch.uint8, device=dev)
    if n == 0:
        return out
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device=dev)
    for c, col, rb in _plan(views, n):
        dt = _word(c.offset, c.block_stride, c.nbytes, col, rb)
        w = torch.tensor([], dtype=dt).element_size()
        nwords = c.nbytes // w
        grid = (n, triton.cdiv(nwords, TILE))
        _gather_kernel[grid](c.base.view(dt), out.view(dt), ids, c.block_stride // w,
                             c.offset // w, rb // w, col // w, nwords, TILE=TILE)
    return out


def scatter(views: Sequence[BlockView], block_ids: Sequence[int], rows: torch.Tensor) -> None:
    n = len(block_ids)
    if n == 0:
        return
    check_rows(views, n, rows)
    dev = views[0].tensor.device
    rows = rows.to(dev).contiguous()
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device=dev)
    for c, col, rb in _plan(views, n):
        dt = _word(c.offset, c.block_stride, c.nbytes, col, rb)
        w = torch.tensor([], dtype=dt).element_size()
        nwords = c.nbytes // w
        grid = (n, triton.cdiv(nwords, TILE))
        _scatter_kernel[grid](rows.view(dt), c.base.view(dt), ids, c.block_stride // w,
                              c.offset // w, rb // w, col // w, nwords, TILE=TILE)
