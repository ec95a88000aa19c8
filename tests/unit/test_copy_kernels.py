"""The torch reference copy path: gather then scatter is an exact byte round trip."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvtier.kernels.torch_copy import BlockView, gather, row_bytes, scatter  # noqa: E402


def hybrid_views(num_blocks: int = 12, seed: int = 0) -> list[BlockView]:
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(num_blocks, 2, 16, 128, generator=g).to(torch.bfloat16)
    # GDN-style raw page: int8 rows inside a larger stride, like vLLM's shared allocation.
    backing = torch.randint(-128, 127, (num_blocks, 1, 1, 400), dtype=torch.int8, generator=g)
    gdn = backing[..., :300]
    kv_first = torch.randn(2, num_blocks, 8, generator=g)  # block dim 1 (GPU-style layout)
    return [BlockView(attn), BlockView(gdn), BlockView(kv_first, 1)]


def test_gather_rows_are_the_blocks_bytes():
    views = hybrid_views()
    rows = gather(views, [4, 0, 9])
    assert rows.shape == (3, row_bytes(views)) and rows.dtype == torch.uint8
    first = views[0].tensor[0].contiguous().view(torch.uint8).flatten()
    assert torch.equal(rows[1, : first.numel()], first)


def test_scatter_inverts_gather_into_other_blocks():
    src, dst = hybrid_views(seed=1), hybrid_views(seed=2)
    untouched = [v.tensor.clone() for v in dst]
    scatter(dst, [7, 2, 11], gather(src, [1, 5, 3]))
    for s, d, before in zip(src, dst, untouched):
        pick = lambda t, i, v=s: t.select(v.block_dim, i)  # noqa: E731
        assert torch.equal(pick(d.tensor, 7), pick(s.tensor, 1))
        assert torch.equal(pick(d.tensor, 2), pick(s.tensor, 5))
        assert torch.equal(pick(d.tensor, 11), pick(s.tensor, 3))
        assert torch.equal(pick(d.tensor, 0), pick(before, 0))  # other blocks untouched


def test_scatter_rejects_mismatched_rows():
    views = hybrid_views()
    with pytest.raises(ValueError, match="do not match"):
        scatter(views, [1, 2], torch.zeros(2, row_bytes(views) - 1, dtype=torch.uint8))
