"""Does the Redis backend cost anything on top of redis-py? A side-by-side read benchmark.

Stores a ~64 MiB hybrid prefix (attention blocks plus GDN states, ~196 KB
payloads as in the tiny Qwen3-Next layout) and reads it back alternately
through :meth:`RedisBackend.get_many` and through a raw redis-py (hiredis)
pipeline of GETs built with the very same connection settings. Runs are
interleaved (alternating who goes first) and the ratio is the median of the
per-round ratios, so load from other processes hits both sides alike. The goal is a ratio >= 0.9.

    python -m kvtier.benches.redis                       # own standalone + 3-node cluster
    python -m kvtier.benches.redis --url redis://h:6379 --url redis+cluster://h1:7000,h2:7001
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.redis import RedisBackend
from kvtier.keys import BlockKey, Namespace, namespace_prefix
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery

GOAL = 0.9
PAGE = 196_608
GROUPS = [GroupQuery(g, GroupKind.STATE) for g in range(3)] + [GroupQuery(3, GroupKind.ATTENTION)]


def _prefix(total_bytes: int) -> tuple[bytes, list[bytes], list[PutItem]]:
    """Every boundary: one attention block and three GDN states, ~``total_bytes`` in all."""
    ns = Namespace("bench-qwen3next", "page=196608", uuid.uuid4().hex).id
    layout = payload.layout_digest("bench")
    per_boundary = len(GROUPS) * PAGE
    boundaries = max(1, total_bytes // per_boundary)
    hashes, items, h, parent = [], [], b"bench", None
    rnd = os.urandom(PAGE * 2)
    for b in range(boundaries):
        h = hashlib.sha256(h + b.to_bytes(4, "little")).digest()
        hashes.append(h)
        attention = BlockKey(ns, 0, GROUPS[-1].group_id, h).encode()
        for g in (GROUPS[-1], *GROUPS[:-1]):  # parents first: the attention block, then states
            key = BlockKey(ns, 0, g.group_id, h)
            off = (b * 7919 + g.group_id * 104_729) % PAGE  # distinct bytes per block
            enc = payload.encode(key, layout, rnd[off : off + PAGE])
            link = parent if g.kind is GroupKind.ATTENTION else attention
            items.append(PutItem(key.encode(), enc, link))
        parent = attention
    return ns, hashes, items


def _raw_get(client: Any, keys: Sequence[bytes]) -> list[bytes | None]:
    """What a user would write with redis-py alone: one pipeline of GETs."""
    pipe = client.pipeline(transaction=False) if not _is_cluster(client) else client.pipeline()
    for k in keys:
        pipe.get(k)
    return pipe.execute()


def _is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_one(
    url: str,
    total_bytes: int = 64 << 20,
    rounds: int = 15,
    **backend_options: Any,
) -> dict:
    """Benchmark one Redis target; returns throughputs (GB/s), their ratio and latencies."""
    ns, hashes, items = _prefix(total_bytes)
    keys = [it.key for it in items]
    nbytes = sum(len(it.value) for it in items)
    backend = RedisBackend(url, **backend_options)
    raw = backend._connect()  # same host, auth, TLS, timeouts and parser as the backend
    try:
        t_put = _timed(lambda: backend.put_many(items))
        got = backend.get_many(keys)
        if got != [it.value for it in items] or _raw_get(raw, keys) != got:
            raise RuntimeError("read back different bytes than stored")
        del got
        t_tier: list[float] = []
        t_raw: list[float] = []
        for i in range(rounds):  # interleaved, alternating who goes first
            pair = [(t_tier, lambda: backend.get_many(keys)), (t_raw, lambda: _raw_get(raw, keys))]
            for bucket, fn in pair if i % 2 == 0 else pair[::-1]:
                bucket.append(_timed(fn))
        q = LookupQuery(ns, 0, hashes, 1, GROUPS)
        t_lookup = min(_timed(lambda: backend.lookup(q)) for _ in range(5))
        boundary = backend.lookup(q).boundary
        mode = backend.stats().extra["mode"]
        backend.flush(namespace_prefix(ns))
    finally:
        with contextlib.suppress(Exception):
            backend.flush(namespace_prefix(ns))
        backend.close()
        raw.close()
    tier_gbs = nbytes / statistics.median(t_tier) / 1e9
    raw_gbs = nbytes / statistics.median(t_raw) / 1e9
    return {
        "url": backend.url,
        "mode": mode,
        "namespace": ns.hex(),
        "payloads": len(items),
        "payload_bytes": len(items[0].value),
        "total_mib": nbytes / (1 << 20),
        "put_gbs": nbytes / t_put / 1e9,
        "tier_get_gbs": tier_gbs,
        "raw_get_gbs": raw_gbs,
        "tier_get_best_gbs": nbytes / min(t_tier) / 1e9,
        "raw_get_best_gbs": nbytes / min(t_raw) / 1e9,
        # Median of per-round ratios: each pair ran back to back, so drifting load cancels.
        "ratio": statistics.median(r / t for r, t in zip(t_raw, t_tier, strict=True)),
        "goal": GOAL,
        "lookup_ms": t_lookup * 1e3,
        "lookup_keys": len(keys),
        "lookup_boundary": boundary,
        "rounds": rounds,
    }


@contextlib.contextmanager
def _own_servers() -> Iterator[list[str]]:
    from kvtier.testing.redis_servers import redis_cluster, redis_standalone

    with redis_standalone() as srv, redis_cluster() as cl:
        yield [srv.url(), cl.url()]


def run_redis_bench(
    url: str | Sequence[str] | None = None,
    total_bytes: int = 64 << 20,
    rounds: int = 15,
    **backend_options: Any,
) -> dict:
    """Bench ``url`` (or several); with none, start a standalone server and a 3-node cluster.

    Returns ``{"goal", "ok", "results": [per-target dict, ...]}``.
    """
    urls = [url] if isinstance(url, str) else list(url or [])
    with contextlib.ExitStack() as stack:
        if not urls:
            urls = stack.enter_context(_own_servers())
        results = [bench_one(u, total_bytes, rounds, **backend_options) for u in urls]
    return {"goal": GOAL, "ok": all(r["ratio"] >= GOAL for r in results), "results": results}


def _table(results: list[dict]) -> Any:
    from rich.table import Table

    t = Table(title=f"RedisBackend.get_many vs raw redis-py pipelined GET (goal >= {GOAL})")
    cols = ("target", "payloads", "MiB", "put GB/s", "tier get GB/s", "raw get GB/s",
            "ratio", "best tier/raw", "lookup")
    for col in cols:
        t.add_column(col, justify="left" if col == "target" else "right", no_wrap=True)
    for r in results:
        ok = "green" if r["ratio"] >= GOAL else "red"
        t.add_row(
            r["mode"],
            f"{r['payloads']} x {r['payload_bytes'] / 1e3:.0f} KB",
            f"{r['total_mib']:.1f}",
            f"{r['put_gbs']:.2f}",
            f"{r['tier_get_gbs']:.2f}",
            f"{r['raw_get_gbs']:.2f}",
            f"[{ok}]{r['ratio']:.2f}[/{ok}]",
            f"{r['tier_get_best_gbs']:.2f} / {r['raw_get_best_gbs']:.2f}",
            f"{r['lookup_ms']:.1f} ms / {r['lookup_keys']} keys",
        )
    return t


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(
        prog="python -m kvtier.benches.redis", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument(
        "--url", action="append", help="tier url (repeatable); default: start own servers"
    )
    ap.add_argument("--mib", type=int, default=64, help="size of the stored prefix (MiB)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved read rounds per side")
    args = ap.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    with console.status("storing and reading the prefix ..."):
        out = run_redis_bench(args.url, args.mib << 20, args.rounds)
    console.print(_table(out["results"]))
    for r in out["results"]:
        console.print(f"  {r['mode']}: {r['url']}  (median of {r['rounds']} interleaved rounds)")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
