"""The CPU fast path of the torch copy path: big contiguous blocks move as raw byte runs
(a memmove each, split across threads), everything else through torch's indexed copies.

Checked against plain torch indexing (no kvtier code) and against each other; spies
only count calls and delegate to the real functions.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from kvtier.kernels import byte_runs, torch_copy  # noqa: E402
from kvtier.kernels.torch_copy import BlockView, byte_run, gather, row_bytes, scatter  # noqa: E402


def run_views(num_blocks: int = 10, seed: int = 0) -> list[BlockView]:
    """Layouts whose blocks are byte runs: attention K and V planes (block dim 0) and a
    GDN-style packed page (conv and ssm states side by side in one page per block)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, 16, 2, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(num_blocks, 16, 2, 64, generator=g).to(torch.bfloat16)
    page = torch.randint(-128, 127, (num_blocks, 20000), dtype=torch.int8, generator=g)
    conv = page[:, :6144].view(torch.bfloat16).view(num_blocks, 3, 1024)
    ssm = page[:, 6144:14336].view(torch.float32).view(num_blocks, 2, 32, 32)
    return [BlockView(k), BlockView(v), BlockView(conv), BlockView(ssm)]


def other_views(num_blocks: int = 10, seed: int = 0) -> list[BlockView]:
    """Layouts the indexed copies take: small blocks, big strided blocks, block dim 1."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(num_blocks, 2, 16, 8, generator=g)  # 1 KiB per block
    strided = torch.randint(-128, 127, (num_blocks, 8, 1200), dtype=torch.int8,
                            generator=g)[..., :1000]
    kv_first = torch.randn(2, num_blocks, 2048, generator=g)
    return [BlockView(small), BlockView(strided), BlockView(kv_first, 1)]


def same(a: BlockView, b: BlockView) -> bool:
    """Byte equality (the page bytes read as floats hold NaNs)."""
    return torch.equal(*(x.tensor.contiguous().flatten().view(torch.uint8) for x in (a, b)))


def expected_rows(views: list[BlockView], ids: list[int]) -> torch.Tensor:
    return torch.stack([torch.cat([v.tensor.select(v.block_dim, i).contiguous().view(-1)
                                   .view(torch.uint8) for v in views]) for i in ids])


class _Calls(list):
    threads: list[int | None]

    def __init__(self) -> None:
        super().__init__()
        self.threads = []


@pytest.fixture
def runs_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of runs of every real ``copy_runs`` call (and its ``threads`` in
    ``runs_spy.threads``)."""
    calls = _Calls()
    real = byte_runs.copy_runs

    def spy(dst, src, sizes, threads=None):  # noqa: ANN001, ANN202
        calls.append(len(sizes))
        calls.threads.append(threads)
        return real(dst, src, sizes, threads)

    monkeypatch.setattr(byte_runs, "copy_runs", spy)
    return calls


def test_which_views_are_byte_runs():
    assert all(byte_run(v) is not None for v in run_views())
    assert all(byte_run(v) is None for v in other_views())
    big = torch.randn(4, 2048)
    assert byte_run(BlockView(big.to(torch.complex64).conj())) is None  # bytes are not values
    assert byte_run(BlockView(torch.empty(4, 2048, device="meta"))) is None  # not on the CPU
    assert byte_run(BlockView(big)) == (big.data_ptr(), 2048 * 4)


def test_runs_gather_and_scatter_only_the_run_views(runs_spy: list[int]):
    views = run_views() + other_views()
    ids = [7, 0, 9, 3]
    rows = gather(views, ids)
    assert torch.equal(rows, expected_rows(views, ids))
    assert runs_spy == [len(ids) * len(run_views())]  # one call: 4 run views x 4 blocks
    dst = run_views(seed=1) + other_views(seed=1)
    scatter(dst, [1, 2, 5, 8], rows)
    assert runs_spy[1:] == [len(ids) * len(run_views())]
    assert torch.equal(gather(dst, [1, 2, 5, 8]), rows)
    calls = len(runs_spy)
    gather(other_views(), ids)
    assert len(runs_spy) == calls  # no runs at all


def test_scatter_from_payload_buffers_without_joining(monkeypatch: pytest.MonkeyPatch):
    joined: list[int] = []
    real = torch_copy.stack_rows
    monkeypatch.setattr(torch_copy, "stack_rows",
                        lambda views, n, rows: joined.append(n) or real(views, n, rows))
    src, ids, dst_ids = run_views(), [4, 1, 6], [0, 9, 2]
    payloads = [memoryview(bytes(r.numpy())) for r in gather(src, ids)]  # read-only
    by_buffers, by_rows = run_views(seed=2), run_views(seed=2)
    scatter(by_buffers, dst_ids, payloads)
    scatter(by_rows, dst_ids, gather(src, ids))
    assert joined == []  # copied straight from the payloads
    assert all(same(a, b) for a, b in zip(by_buffers, by_rows))
    assert torch.equal(gather(by_buffers, dst_ids), gather(src, ids))
    # A layout with views the indexed copies take joins the buffers once.
    mixed_src, mixed_a, mixed_b = (run_views(seed=s) + other_views(seed=s) for s in (3, 4, 4))
    payloads = [bytes(r.numpy()) for r in gather(mixed_src, ids)]
    scatter(mixed_a, dst_ids, payloads)
    scatter(mixed_b, dst_ids, gather(mixed_src, ids))
    assert joined == [len(ids)]
    assert all(same(a, b) for a, b in zip(mixed_a, mixed_b))


def test_payload_buffers_of_the_wrong_size_are_refused():
    views = run_views()
    good = bytes(row_bytes(views))
    with pytest.raises(ValueError, match="do not match"):
        scatter(views, [0, 1], [good, good[:-1]])
    with pytest.raises(ValueError, match="do not match"):
        scatter(views, [0, 1], [good])


def test_block_ids_out_of_range_raise_and_copy_nothing():
    views = other_views() + run_views()  # checked before even the indexed copies
    before = [BlockView(v.tensor.clone()) for v in views]
    rows = torch.zeros(2, row_bytes(views), dtype=torch.uint8)
    for ids in ([0, 10], [-1, 2]):
        with pytest.raises(IndexError, match="out of range"):
            scatter(views, ids, rows)
        with pytest.raises(IndexError, match="out of range"):
            gather(views, ids)
    assert all(same(v, b) for v, b in zip(views, before))


def test_a_block_scattered_twice_keeps_the_later_row(runs_spy: _Calls,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(byte_runs, "MIN_BYTES_PER_THREAD", 1 << 10)  # threads if allowed
    views = run_views()
    rows = torch.stack([torch.full((row_bytes(views),), x, dtype=torch.uint8) for x in (1, 2, 3)])
    scatter(views, [5, 6, 5], rows)
    assert torch.equal(gather(views, [5, 6]), rows[[2, 1]])
    # Threads would race on block 5 (rarely visibly): the runs are copied in order.
    assert runs_spy.threads[0] == 1


def test_gather_into_rows_that_are_not_contiguous():
    views = run_views()
    wide = torch.zeros(3, row_bytes(views) + 64, dtype=torch.uint8)
    out = wide[:, 32:32 + row_bytes(views)]  # rows with a gap between them
    assert gather(views, [2, 8, 0], out=out) is out
    assert torch.equal(out, expected_rows(views, [2, 8, 0]))
    assert not wide[:, :32].any() and not wide[:, -32:].any()  # nothing written outside
    strided = torch.zeros(row_bytes(views), 3, dtype=torch.uint8).t()  # columns step by 3
    assert torch.equal(gather(views, [4, 1, 9], out=strided), expected_rows(views, [4, 1, 9]))


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_copy_runs_on_threads_is_every_memmove(threads: int, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(threads)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst, want = np.zeros(1 << 20, np.uint8), np.zeros(1 << 20, np.uint8)
    sizes = rng.integers(1, 5000, 150).tolist()
    d_off = np.cumsum([0, *sizes[:-1]]).tolist()  # disjoint destinations, shuffled sources
    s_off = rng.integers(0, (1 << 20) - 5000, 150).tolist()
    for d, s, c in zip(d_off, s_off, sizes):
        want[d:d + c] = src[s:s + c]
    ran_on: list[int] = []  # the thread of every chunk
    real = byte_runs._run
    monkeypatch.setattr(byte_runs, "_run",
                        lambda *a: ran_on.append(threading.get_ident()) or real(*a))
    byte_runs.copy_runs([dst.ctypes.data + d for d in d_off],
                        [src.ctypes.data + s for s in s_off], sizes, threads)
    assert np.array_equal(dst, want)
    assert len(ran_on) == threads  # that many chunks, the caller's and the pool's
    assert len(set(ran_on)) >= min(threads, 2)  # really on other threads than the caller


def test_threads_follow_size_and_torch_threads(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert byte_runs.threads_for(100 << 10) == 1  # a small copy stays on the caller
    assert byte_runs.threads_for(64 << 20) == min(2, byte_runs.threads_for(1 << 40))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert byte_runs.threads_for(64 << 20) == 1


def test_big_gather_and_scatter_on_threads_round_trip(runs_spy: list[int],
                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(byte_runs, "MIN_BYTES_PER_THREAD", 1 << 10)
    src, dst = run_views(num_blocks=40, seed=5), run_views(num_blocks=40, seed=6)
    ids = list(range(39, -1, -3))
    scatter(dst, ids[::-1], gather(src, ids))
    assert torch.equal(gather(dst, ids[::-1]), expected_rows(src, ids))


def _copy_on_two_threads() -> bool:
    """Two equal runs on two threads: the caller's and the pool's."""
    a = np.arange(8 << 20, dtype=np.uint8)
    b = np.zeros_like(a)
    half = a.nbytes // 2
    ran_on: list[int] = []
    real = byte_runs._run

    def spy(*args) -> None:  # noqa: ANN002
        ran_on.append(threading.get_ident())
        real(*args)

    byte_runs._run = spy
    try:
        byte_runs.copy_runs([b.ctypes.data, b.ctypes.data + half], [a.ctypes.data,
                            a.ctypes.data + half], [half, half], threads=2)
    finally:
        byte_runs._run = real
    return bool(np.array_equal(a, b)) and len(set(ran_on)) == 2


def _child(conn) -> None:  # noqa: ANN001 - a forked child's work
    conn.send(_copy_on_two_threads())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_copies_on_its_own_threads():
    import multiprocessing as mp

    assert _copy_on_two_threads()  # the parent's pool exists (and idles) at the fork
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child,))
    p.start()
    try:
        assert parent.poll(60), "the child's copy never finished (a pool inherited dead)"
        assert parent.recv() is True
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
