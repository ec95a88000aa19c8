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
    # Big blocks take the block-by-block CPU path when contiguous, the indexed one when not.
    big_strided = torch.randint(-128, 127, (num_blocks, 8, 1200), dtype=torch.int8,
                                generator=g)[..., :1000]
    big_kv_first = torch.randn(2, num_blocks, 2048, generator=g)
    return [BlockView(attn), BlockView(gdn), BlockView(kv_first, 1), BlockView(big_strided),
            BlockView(big_kv_first, 1)]


def block_bytes(v: BlockView, i: int) -> torch.Tensor:
    """Block ``i`` of one view as bytes, straight from the tensor (no kvtier code)."""
    return v.tensor.select(v.block_dim, i).contiguous().view(torch.uint8).flatten()


def test_gather_rows_are_the_blocks_bytes():
    views = hybrid_views()
    ids = [4, 0, 9, 4, 11]  # out of order, repeated, first and last
    rows = gather(views, ids)
    assert rows.shape == (len(ids), row_bytes(views)) and rows.dtype == torch.uint8
    for row, i in zip(rows, ids):  # every row: every view's bytes of its block, in order
        assert torch.equal(row, torch.cat([block_bytes(v, i) for v in views]))


def test_gather_into_a_reused_buffer():
    views = hybrid_views(seed=3)
    out = torch.full((3, row_bytes(views)), 7, dtype=torch.uint8)
    assert gather(views, [2, 5, 1], out=out) is out
    assert torch.equal(out, gather(views, [2, 5, 1]))
    with pytest.raises(ValueError, match="do not match"):
        gather(views, [2, 5], out=out)


def test_scatter_inverts_gather_into_other_blocks():
    src, dst = hybrid_views(seed=1), hybrid_views(seed=2)
    before = [v.tensor.clone() for v in dst]
    moved = {7: 1, 2: 5, 11: 3, 0: 0}  # destination block -> source block
    scatter(dst, list(moved), gather(src, list(moved.values())))
    for s, d, b in zip(src, dst, before):
        for j in range(d.tensor.shape[d.block_dim]):  # every block of every view
            expect = s.tensor.select(s.block_dim, moved[j]) if j in moved else \
                b.select(d.block_dim, j)
            assert torch.equal(d.tensor.select(d.block_dim, j), expect), (d.describe(), j)


def test_scatter_rejects_mismatched_rows():
    views = hybrid_views()
    with pytest.raises(ValueError, match="do not match"):
        scatter(views, [1, 2], torch.zeros(2, row_bytes(views) - 1, dtype=torch.uint8))
