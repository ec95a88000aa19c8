"""Reference copy path: gather paged blocks into a contiguous staging buffer and back.

A "block view" is one layer's KV tensor with its block dimension identified.
``gather`` packs the selected blocks of several layers into a ``[n, bytes]``
uint8 staging tensor (row = one stored payload body); ``scatter`` is its
inverse. On a GPU the Triton kernels in :mod:`kvtier.kernels.triton_copy` do
the same and are checked against this path.

On the CPU, big blocks that are each one contiguous byte run (attention K/V
planes, packed state pages) are moved as raw runs, a memmove each on a few
threads (:mod:`kvtier.kernels.byte_runs`); small or strided blocks and other
devices take torch's indexed copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.kernels import byte_runs

Buffer = bytes | bytearray | memoryview


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


def _buffer_rows(views: Sequence[BlockView], n: int, rows: Sequence[Buffer]) -> list[np.ndarray]:
    """``rows`` as uint8 arrays (no copy), checked: ``n`` buffers of ``row_bytes(views)``."""
    arrays = [np.frombuffer(r, dtype=np.uint8) for r in rows]
    width = row_bytes(views)
    if len(arrays) != n or any(a.nbytes != width for a in arrays):
        raise ValueError(f"staging buffers ({len(arrays)}) do not match "
                         f"{n} blocks of {width} bytes")
    return arrays


def stack_rows(views: Sequence[BlockView], n: int, rows: Sequence[Buffer]) -> torch.Tensor:
    """``n`` per-block byte buffers as one ``[n, row_bytes(views)]`` uint8 tensor (one
    copy): what a path that needs a single tensor (Triton, the indexed copies) takes."""
    _buffer_rows(views, n, rows)
    if n * row_bytes(views) == 0:
        return torch.empty((n, row_bytes(views)), dtype=torch.uint8)
    return torch.frombuffer(bytearray().join(rows), dtype=torch.uint8).view(n, -1)


# Blocks of at least this many bytes, each one contiguous run of CPU memory, are copied
# as raw byte runs (:mod:`kvtier.kernels.byte_runs`); torch's indexed copies (one
# ``index_copy_`` on byte rows ran ~17x slower than memcpy) take the rest.
_RUN_BYTES = 4096


def byte_run(v: BlockView) -> tuple[int, int] | None:
    """(address of block 0, bytes from a block to the next) when ``v``'s blocks are copied
    as raw byte runs; None when torch's indexed copies move them (small or strided blocks,
    not on the CPU, tensors whose bytes are not their values)."""
    t = v.tensor
    if (t.device.type != "cpu" or v.block_nbytes < _RUN_BYTES or t.shape[v.block_dim] == 0
            or t.is_quantized or t.is_conj() or t.is_neg()
            or not t.select(v.block_dim, 0).is_contiguous()):
        return None
    return t.data_ptr(), t.stride(v.block_dim) * t.element_size()


def _block_addrs(v: BlockView, run: tuple[int, int], ids: list[int]) -> list[int]:
    size = v.tensor.shape[v.block_dim]
    if min(ids) < 0 or max(ids) >= size:  # raw addresses: never outside the tensor
        raise IndexError(f"block ids {min(ids)}..{max(ids)} out of range for {size} blocks")
    base, step = run
    return [base + i * step for i in ids]


def _row_starts(rows: torch.Tensor) -> list[int]:
    base, step = rows.data_ptr(), rows.stride(0)
    return [base + j * step for j in range(rows.shape[0])]


def _bytes_rows(rows: torch.Tensor) -> bool:
    """Rows whose every row is one contiguous run of CPU bytes."""
    return rows.device.type == "cpu" and (rows.stride(1) == 1 or rows.shape[1] <= 1)


class _Runs:
    """The byte runs of one gather or scatter, copied together (threads split them)."""

    def __init__(self) -> None:
        self.dst: list[int] = []
        self.src: list[int] = []
        self.sizes: list[int] = []

    def add(self, dst: list[int], src: list[int], nbytes: int) -> None:
        self.dst += dst
        self.src += src
        self.sizes += [nbytes] * len(dst)

    def copy(self, ordered: bool = False) -> None:
        if self.sizes:
            byte_runs.copy_runs(self.dst, self.src, self.sizes, 1 if ordered else None)


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
    if not _bytes_rows(out):
        return out.copy_(gather(views, block_ids))
    ids = [int(i) for i in block_ids]
    starts, runs, indexed, col = _row_starts(out), _Runs(), [], 0
    for v in views:  # every run checked before anything is copied
        run = byte_run(v)
        if run is None:
            indexed.append((v, col))
        else:
            runs.add([s + col for s in starts], _block_addrs(v, run, ids), v.block_nbytes)
        col += v.block_nbytes
    for v, col in indexed:
        idx = torch.as_tensor(ids, dtype=torch.long, device=v.tensor.device)
        picked = torch.index_select(v.tensor, v.block_dim, idx).movedim(v.block_dim, 0)
        flat = picked.contiguous().view(n, -1).view(torch.uint8).reshape(n, -1)
        out[:, col : col + v.block_nbytes].copy_(flat)
    runs.copy()
    return out


def scatter(views: Sequence[BlockView], block_ids: Sequence[int],
            rows: torch.Tensor | Sequence[Buffer]) -> None:
    """Write staging ``rows`` into the blocks ``block_ids``: a ``[n, row_bytes(views)]``
    uint8 tensor (as :func:`gather` makes) or ``n`` buffers of ``row_bytes(views)`` bytes
    each (decoded payloads: copied straight into the blocks when every view is a byte
    run, so a restore need not join them first)."""
    n = len(block_ids)
    if n == 0:
        return
    ids = [int(i) for i in block_ids]
    byte_views = [byte_run(v) for v in views]
    starts: list[int] | None = None  # where each row begins, when runs copy from it
    if isinstance(rows, torch.Tensor):
        check_rows(views, n, rows)
        if rows.device.type == "cpu" and any(r is not None for r in byte_views):
            rows = rows if _bytes_rows(rows) else rows.contiguous()
            starts = _row_starts(rows)
    elif all(r is not None for r in byte_views):
        arrays = _buffer_rows(views, n, rows)  # held until the copy is done
        starts = [a.ctypes.data for a in arrays]
    else:
        rows = stack_rows(views, n, rows)
    runs, indexed, col = _Runs(), [], 0
    for v, run in zip(views, byte_views):  # every run checked before anything is copied
        if run is None or starts is None:
            indexed.append((v, col))
        else:
            runs.add(_block_addrs(v, run, ids), [s + col for s in starts], v.block_nbytes)
        col += v.block_nbytes
    for v, col in indexed:
        idx = torch.as_tensor(ids, dtype=torch.long, device=v.tensor.device)
        part = rows[:, col : col + v.block_nbytes].contiguous()
        src = part.view(v.tensor.dtype).reshape(n, *v.block_shape).to(v.tensor.device)
        v.tensor.index_copy_(v.block_dim, idx, src.movedim(0, v.block_dim))
    runs.copy(ordered=len(set(ids)) < n)  # a block written twice: the later row wins
