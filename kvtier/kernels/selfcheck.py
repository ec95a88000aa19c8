"""Check the Triton kernels against the torch reference on hybrid-shaped blocks.

``python -m kvtier.kernels.selfcheck`` runs on CUDA when present; without a GPU
run it with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter). Exits 1 on any
byte mismatch. :func:`selection_report` also checks which path
:func:`kvtier.kernels.select` picks per layout and that the picked path copies
exactly like the reference.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from kvtier.kernels import select
from kvtier.kernels import torch_copy as ref
from kvtier.kernels.torch_copy import BlockView


def hybrid_views(device: str, num_blocks: int, seed: int) -> list[BlockView]:
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(num_blocks, 2, 16, 128, generator=g).to(torch.bfloat16)
    backing = torch.randint(-128, 127, (num_blocks, 1, 1, 400), dtype=torch.int8, generator=g)
    kv_first = torch.randn(2, num_blocks, 24, generator=g)
    odd = torch.randint(0, 255, (num_blocks, 37), dtype=torch.uint8, generator=g)  # byte words
    # A packed state page per block, conv then ssm, big enough for torch's byte-run path.
    page = torch.randn(num_blocks, 3 * 1024 + 64, generator=g).to(device)
    conv, ssm = page[:, :1024], page[:, 1024:3072].view(num_blocks, 32, 64)
    return [BlockView(attn.to(device)), BlockView(backing.to(device)[..., :300]),
            BlockView(kv_first.to(device), 1), BlockView(odd.to(device)),
            BlockView(conv), BlockView(ssm)]


def _transposed(n: int, g: torch.Generator) -> BlockView:  # per-block bytes not contiguous
    return BlockView(torch.randn(n, 16, 8, generator=g).transpose(1, 2))


def _block_dim_2(n: int, g: torch.Generator) -> BlockView:
    return BlockView(torch.randn(2, 3, n, 8, generator=g), 2)


# name -> (views maker, whether the Triton kernels can copy that layout)
LAYOUTS: dict[str, tuple[Callable[[int, int], list[BlockView]], bool]] = {
    "hybrid (block dim 0 and 1, strided page, byte words)":
        (lambda n, s: hybrid_views("cpu", n, s), True),
    "non-contiguous per-block bytes":
        (lambda n, s: [_transposed(n, torch.Generator().manual_seed(s))], False),
    "block dim 2": (lambda n, s: [_block_dim_2(n, torch.Generator().manual_seed(s))], False),
    "capable views plus one non-contiguous view":
        (lambda n, s: [*hybrid_views("cpu", n, s),
                       _transposed(n, torch.Generator().manual_seed(s))], False),
}


def compare(views_src: Callable[[int], list[BlockView]], device: Any) -> dict[str, Any]:
    """Gather and scatter through ``select(views, device)`` vs the torch reference,
    compared view by view and row by row."""
    src = views_src(0)
    path = select(src, device, label="selfcheck")
    chosen = path.name
    ids, dst_ids = [5, 0, 15, 7, 7], [1, 2, 3, 4, 9]
    want, got = ref.gather(src, ids), path.gather(src, ids).cpu()
    cells = []  # (row, view) byte ranges equal
    for r in range(len(ids)):
        col = 0
        for v in src:
            cells.append(torch.equal(want[r, col:col + v.block_nbytes],
                                     got[r, col:col + v.block_nbytes]))
            col += v.block_nbytes
    dst_ref, dst_sel = views_src(1), views_src(1)
    ref.scatter(dst_ref, dst_ids, want)
    path.scatter(dst_sel, dst_ids, want)
    scattered = [torch.equal(a.tensor.cpu(), b.tensor.cpu()) for a, b in zip(dst_ref, dst_sel)]
    return {"chosen": chosen, "after": path.name, "views": len(src), "rows": len(ids),
            "gather_cells_equal": cells, "scatter_views_equal": scattered}


def selection_report(device: str = "cuda") -> dict[str, dict[str, Any]]:
    """Per layout: the expected and chosen path and the comparison with the reference.
    ``device`` is the device the selection assumes (CPU tensors stand in for it here)."""
    out = {}
    for name, (make, capable) in LAYOUTS.items():
        out[name] = {"triton_capable": capable,
                     **compare(lambda s, make=make: make(16, s), device)}
    return out


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from kvtier.kernels import triton_copy as tri

    src = hybrid_views(device, 16, 0)
    ids = [5, 0, 15, 7, 7]
    a, b = ref.gather(src, ids), tri.gather(src, ids)
    ok = torch.equal(a.cpu(), b.cpu())
    dst_ref, dst_tri = hybrid_views(device, 16, 1), hybrid_views(device, 16, 1)
    ref.scatter(dst_ref, [1, 2, 3, 4, 9], a)
    tri.scatter(dst_tri, [1, 2, 3, 4, 9], a)
    ok = ok and all(torch.equal(x.tensor.cpu(), y.tensor.cpu()) for x, y in zip(dst_ref, dst_tri))
    print(f"triton vs torch on {device}: {'identical' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
