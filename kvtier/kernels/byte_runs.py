"""Many block-sized memcpys on CPU, off the GIL, on a few threads.

Moving a request's blocks between staging rows and a paged cache is hundreds
of ~100 KiB byte runs at scattered addresses. One torch ``copy_`` per block
pays for building views and dispatch on every block (most of the time at these
sizes), and ``index_copy_`` on byte rows is far slower than memcpy. Here each
run is one libc ``memmove`` through ctypes, which releases the GIL, and the
runs are split across up to :data:`MAX_THREADS` threads: one core's copy rate
is about half the machine's memory bandwidth (torch's own big copies use its
intra-op threads for the same reason).

Addresses are raw: the caller checks that every run lies inside memory it
holds alive for the call (:mod:`kvtier.kernels.torch_copy` does).
"""

from __future__ import annotations

import ctypes
import os
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate, starmap

import torch

MAX_THREADS = 4  # memory bandwidth, not cores, bounds a copy beyond a few threads
MIN_BYTES_PER_THREAD = 2 << 20  # below this a thread hand-off costs more than it saves

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads_for(nbytes: int) -> int:
    """How many threads copy ``nbytes``: no more than torch's intra-op threads or the
    CPUs this process may run on, and at least :data:`MIN_BYTES_PER_THREAD` each."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cap = min(MAX_THREADS, torch.get_num_threads(), cpus or 1)
    return max(1, min(cap, nbytes // MIN_BYTES_PER_THREAD))


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone while it still counts them idle: work
    handed to it would never run. The child makes its own."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="kvtier-copy")
        return _pool


def _run(dst: Sequence[int], src: Sequence[int], sizes: Sequence[int]) -> None:
    deque(starmap(ctypes.memmove, zip(dst, src, sizes)), maxlen=0)  # no per-run bytecode


def copy_runs(dst: Sequence[int], src: Sequence[int], sizes: Sequence[int],
              threads: int | None = None) -> None:
    """``memmove(dst[i], src[i], sizes[i])`` for every i, on ``threads`` threads (default
    :func:`threads_for` the total). Runs are handed out in order, in contiguous chunks of
    about equal bytes; with ``threads=1`` a later run wins where destinations overlap."""
    ends = list(accumulate(sizes))
    total = ends[-1] if ends else 0
    k = threads_for(total) if threads is None else max(1, threads)
    if k == 1 or len(ends) < 2:
        _run(dst, src, sizes)
        return
    cuts = [0, *(bisect_right(ends, total * c // k) for c in range(1, k)), len(ends)]
    chunks = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    pool = _executor()
    futures = [pool.submit(_run, dst[a:b], src[a:b], sizes[a:b]) for a, b in chunks[1:]]
    try:
        a, b = chunks[0]
        _run(dst[a:b], src[a:b], sizes[a:b])
    finally:
        for f in futures:  # every chunk is done (or failed) before the caller's memory may go
            f.result()
