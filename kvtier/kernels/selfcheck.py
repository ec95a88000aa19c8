"""Check the Triton kernels against the torch reference on hybrid-shaped blocks.

``python -m kvtier.kernels.selfcheck`` runs on CUDA when present; without a GPU
run it with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter). Exits 1 on any
byte mismatch.
"""

from __future__ import annotations

import sys

import torch

from kvtier.kernels import torch_copy as ref
from kvtier.kernels import triton_copy as tri
from kvtier.kernels.torch_copy import BlockView


def hybrid_views(device: str, num_blocks: int, seed: int) -> list[BlockView]:
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(num_blocks, 2, 16, 128, generator=g).to(torch.bfloat16)
    backing = torch.randint(-128, 127, (num_blocks, 1, 1, 400), dtype=torch.int8, generator=g)
    kv_first = torch.randn(2, num_blocks, 24, generator=g)
    odd = torch.randint(0, 255, (num_blocks, 37), dtype=torch.uint8, generator=g)  # byte words
    return [BlockView(attn.to(device)), BlockView(backing.to(device)[..., :300]),
            BlockView(kv_first.to(device), 1), BlockView(odd.to(device))]


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
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
