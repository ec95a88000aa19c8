"""``kvtier bench reliability``: attacks, fuzzing, load and a restart, against real servers.

One run prints:

- **attacks** on a TLS + token tier: requests refused per attack (no token,
  wrong token, expired token, another tenant's key over gRPC and the bulk port,
  plaintext to the TLS ports, oversized frames); any served is a failure;
- **fuzzing**: random and garbage requests to every RPC (:mod:`kvtier.testing.fuzz`),
  cases tried, unclear answers and server crashes (goal 0), the server's data kept;
- **load**: N client processes x M mixed ops (lookup / get / put / delete, value
  sizes log-uniform between two bounds) on one server: errors (failed calls and
  bytes that do not verify; goal 0), p50/p99 per op, peak server RSS above its
  idle baseline vs the store capacity (goal: within capacity + 5 %);
- **fault: warm restart** while clients read: reads completed, wrong bytes
  (goal 0), seconds from SIGTERM until reads succeed again, entries back.

Engine-level faults (tier killed while engines run, partition, Redis failover)
are end-to-end tests with token comparisons; see the README.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import os
import random
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kvtier import payload
from kvtier.backends import BackendError, open_backend
from kvtier.backends.base import PutItem
from kvtier.config import parse_bytes
from kvtier.keys import BlockKey, Namespace, manifest_key
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery
from kvtier.testing.tier_proc import TierProcess

LAYOUT = payload.layout_digest("reliability bench")
OPS = (("lookup", 0.25), ("get", 0.3), ("put", 0.35), ("delete", 0.1))


# -- load ------------------------------------------------------------------------------------
def _client(args: tuple) -> dict[str, Any]:
    """One load client (own process): mixed ops on its own prefix chain + others' keys."""
    url, cid, n_ops, min_size, max_size, seed = args
    rng = random.Random(seed)
    ns = hashlib.sha256(b"load-%d" % cid).digest()[:16]
    blob = os.urandom(max_size)
    lat: dict[str, list[float]] = {op: [] for op, _ in OPS}
    errors: list[str] = []
    written: list[BlockKey] = []
    hashes = [hashlib.sha256(b"%d-%d" % (cid, i)).digest() for i in range(n_ops)]
    names, weights = zip(*OPS)
    with open_backend(url, timeout_s=60) as b:
        for i in range(n_ops):
            op = rng.choices(names, weights)[0]
            if op != "put" and not written:
                op = "put"
            t0 = time.perf_counter()
            try:
                if op == "put":
                    size = int(math.exp(rng.uniform(math.log(min_size), math.log(max_size))))
                    k = BlockKey(ns, 0, 0, hashes[i])
                    off = rng.randrange(max_size - size + 1)
                    v = payload.encode(k, LAYOUT, memoryview(blob)[off:off + size])
                    parent = written[-1].encode() if written and rng.random() < 0.5 else None
                    b.put_many([PutItem(k.encode(), v, parent)])
                    written.append(k)
                elif op == "get":
                    ks = rng.sample(written, min(len(written), rng.randint(1, 4)))
                    for k, v in zip(ks, b.get_many([k.encode() for k in ks])):
                        if v is not None:
                            payload.decode(v, k, LAYOUT)  # wrong bytes raise
                elif op == "lookup":
                    hs = hashes[:max(1, min(len(written), 64))]
                    b.lookup(LookupQuery(ns, 0, hs, 1, [GroupQuery(0, GroupKind.ATTENTION, 1)]))
                else:
                    k = written.pop(rng.randrange(len(written)))
                    b.delete_many([k.encode()])
            except (BackendError, payload.PayloadError) as e:
                errors.append(f"{op}: {e}")
            lat[op].append(time.perf_counter() - t0)
    return {"lat": lat, "errors": errors}


def _rss_sampler(pid: int, stop: threading.Event, out: list[int]) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out.append(proc.memory_info().rss)
        except psutil.Error:
            return
        stop.wait(0.05)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_load(clients: int, ops: int, min_size: int, max_size: int,
             capacity: int) -> dict[str, Any]:
    with TierProcess(capacity=str(capacity)) as tier:
        assert tier.proc is not None
        time.sleep(0.5)
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_rss_sampler, args=(tier.proc.pid, stop, samples))
        sampler.start()
        time.sleep(0.2)
        baseline = min(samples) if samples else 0
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(clients) as pool:
            results = pool.map(_client, [(tier.url, c, ops, min_size, max_size, c)
                                         for c in range(clients)])
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        with open_backend(tier.url, timeout_s=10) as b:
            st = b.stats()
    lat: dict[str, list[float]] = {op: [] for op, _ in OPS}
    errors: list[str] = []
    for r in results:
        errors += r["errors"]
        for op, xs in r["lat"].items():
            lat[op] += xs
    every = [x for xs in lat.values() for x in xs]
    peak = max(samples) if samples else 0
    return {
        "clients": clients, "ops_per_client": ops, "ops": len(every), "seconds": seconds,
        "errors": len(errors), "error_examples": errors[:5],
        "p50_ms": {op: 1e3 * _pct(xs, 0.5) for op, xs in lat.items()},
        "p99_ms": {op: 1e3 * _pct(xs, 0.99) for op, xs in lat.items()},
        "p99_ms_all": 1e3 * _pct(every, 0.99),
        "capacity_bytes": capacity, "store_bytes": st.bytes_used, "evictions": st.evictions,
        "rss_baseline_bytes": baseline, "rss_peak_bytes": peak,
        "rss_growth_vs_capacity": (peak - baseline) / capacity,
    }


# -- attacks ---------------------------------------------------------------------------------
def _refused(fn) -> bool:  # noqa: ANN001
    try:
        fn()
    except (BackendError, OSError):
        return True
    return False


def run_attacks(attempts: int = 10) -> dict[str, dict[str, int]]:
    import json

    from kvtier.backends.grpc import GrpcBackend
    from kvtier.manifest import NamespaceManifest
    from kvtier.testing.redis_servers import make_tls_files
    from kvtier.transport import tcp_bulk

    d = Path(tempfile.mkdtemp(prefix="kvtier-attacks-"))
    pki = make_tls_files(d)
    ca = str(pki.ca_cert)
    (d / "tokens.json").write_text(json.dumps({"tokens": [
        {"name": "a", "token": "token-a", "tenants": ["a"], "roles": ["read", "write"]},
        {"name": "b", "token": "token-b", "tenants": ["b"], "roles": ["read", "write"]},
        {"name": "old", "token": "token-old", "tenants": ["a"], "roles": ["read"],
         "expires": time.time() - 1}]}))
    ns = Namespace("m", "l", "a").id
    k = BlockKey(ns, 0, 0, b"\x07" * 32)
    items = [PutItem(manifest_key(ns), NamespaceManifest(ns.hex(), "m", "l").to_bytes()),
             PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(4096)))]
    out: dict[str, dict[str, int]] = {}
    with TierProcess(capacity="64MiB", tls_ca=ca, extra_args=(
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--auth-token-file", str(d / "tokens.json"))) as tier:

        def client(token: str | None, **kw: Any) -> GrpcBackend:
            return GrpcBackend(tier.url, timeout_s=3, tls_ca=ca, token=token,
                               token_env=None, **kw)

        with client("token-a") as a:
            a.put_many(items)
            bulk_port = a.health()["bulk_port"]

        def plaintext_bulk() -> None:
            with socket.create_connection(("127.0.0.1", bulk_port), timeout=3) as s:
                s.sendall(tcp_bulk.encode_request([k.encode()]))
                if s.recv(8):
                    return  # answered in the clear: not refused
                raise OSError("dropped")

        def oversized_bulk(token: str) -> None:
            with client(token) as c:
                c.get_many([k.encode()])  # connection up (TLS + hello)
                sock = c._bulk_local.sock
                sock.sendall(b"KVTG" + struct.pack("<I", 0xFFFFFFFF))
                tcp_bulk.read_response(sock, 1)

        attacks = {
            "no token": lambda: client(None, bulk=False).get_many([k.encode()]),
            "wrong token": lambda: client("guess", bulk=False).get_many([k.encode()]),
            "expired token": lambda: client("token-old", bulk=False).get_many([k.encode()]),
            "other tenant's key (gRPC)": lambda: client("token-b", bulk=False).get_many(
                [k.encode()]),
            "other tenant's key (bulk)": lambda: client("token-b").get_many([k.encode()]),
            "plaintext to TLS (gRPC)": lambda: GrpcBackend(
                f"grpc://127.0.0.1:{tier.port}", timeout_s=2, token="token-a").health(),
            "plaintext to TLS (bulk)": plaintext_bulk,
            "oversized frame (bulk)": lambda: oversized_bulk("token-a"),
            "oversized request (gRPC)": lambda: client("token-a", bulk=False).contains_many(
                [b"k"] * ((1 << 20) + 1)),
        }
        for name, fn in attacks.items():
            refused = sum(_refused(fn) for _ in range(attempts))
            out[name] = {"attempts": attempts, "refused": refused, "served": attempts - refused}
        with client("token-a") as a:  # the rightful owner still gets its block
            got = a.get_many([k.encode()])[0]
            out["owner still served"] = {"attempts": 1, "refused": int(got is None),
                                         "served": int(got is not None)}
    return out


# -- fuzzing ---------------------------------------------------------------------------------
def run_fuzz(cases: int) -> dict[str, Any]:
    import grpc
    from hypothesis import HealthCheck, given, settings

    from kvtier.testing import fuzz

    known = BlockKey(hashlib.sha256(b"known").digest()[:16], 0, 0, b"\x42" * 32)
    value = payload.encode(known, LAYOUT, os.urandom(8192))
    tried, unclear = [0], []
    with TierProcess(capacity="64MiB") as tier:
        with open_backend(tier.url, timeout_s=10) as b:
            b.put_many([PutItem(known.encode(), value)])
        ch = grpc.insecure_channel(tier.url.split("://", 1)[1])

        @settings(max_examples=cases, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(fuzz.calls(known.encode()))
        def one(c: tuple) -> None:
            method, reqs = c
            code = fuzz.call(ch, method, [r for r, _ in reqs])
            tried[0] += 1
            if not fuzz.acceptable(code, any(g for _, g in reqs)):
                unclear.append(f"{method.name}: {code.name}")

        one()
        ch.close()
        alive = tier.proc is not None and tier.proc.poll() is None
        with open_backend(tier.url, timeout_s=10) as b:
            kept = bytes(b.get_many([known.encode()])[0] or b"") == value
    return {"cases": tried[0], "unclear_answers": len(unclear), "examples": unclear[:5],
            "server_crashes": int(not alive), "data_kept": kept}


# -- fault: warm restart ---------------------------------------------------------------------
def run_restart(blocks: int = 200, size: int = 64 << 10) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="kvtier-restart-")
    ns = hashlib.sha256(b"restart").digest()[:16]
    keys = [BlockKey(ns, 0, 0, hashlib.sha256(b"%d" % i).digest()) for i in range(blocks)]
    items = [PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(size))) for k in keys]
    tier = TierProcess(capacity="256MiB", extra_args=("--snapshot-dir", d)).start()
    stats = {"completed": 0, "failed": 0, "wrong_bytes": 0, "misses": 0}
    stop = threading.Event()
    down_at: list[float] = []  # SIGTERM sent
    failed_at: list[float] = []  # first read failing after it
    back_at: list[float] = []  # first read succeeding after that

    def reader() -> None:
        rng = random.Random(0)
        with open_backend(tier.url, timeout_s=1, bulk_retry_s=0.2) as b:
            while not stop.is_set():
                ks = rng.sample(range(blocks), 4)
                try:
                    got = b.get_many([keys[i].encode() for i in ks])
                except BackendError:
                    stats["failed"] += 1
                    if down_at and not failed_at:
                        failed_at.append(time.monotonic())
                    time.sleep(0.05)
                    continue
                if failed_at and not back_at:
                    back_at.append(time.monotonic())
                for i, v in zip(ks, got):
                    if v is None:
                        stats["misses"] += 1
                    elif bytes(v) != items[i].value:
                        stats["wrong_bytes"] += 1
                stats["completed"] += 1

    try:
        with open_backend(tier.url, timeout_s=10) as b:
            b.put_many(items)
        t = threading.Thread(target=reader)
        t.start()
        time.sleep(1)
        down_at.append(time.monotonic())
        tier.stop()
        tier.start()
        deadline = time.monotonic() + 30
        while failed_at and not back_at and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        t.join()
        with open_backend(tier.url, timeout_s=10) as b:
            entries = b.stats().entries
    finally:
        tier.kill()
    return {**stats, "entries_before": blocks, "entries_after": entries,
            "seconds_to_recover": (back_at[0] - down_at[0]) if back_at else
            (0.0 if not failed_at else None)}


# -- the bench -------------------------------------------------------------------------------
def run_reliability_bench(clients: int = 32, ops: int = 10_000, min_size: str = "1KiB",
                          max_size: str = "4MiB", capacity: str = "2GiB",
                          fuzz_cases: int = 500, attempts: int = 10,
                          console: Any = None) -> dict[str, Any]:
    res = {"attacks": run_attacks(attempts), "fuzz": run_fuzz(fuzz_cases),
           "load": run_load(clients, ops, parse_bytes(min_size), parse_bytes(max_size),
                            parse_bytes(capacity)),
           "restart": run_restart()}
    if console is not None:
        _print(res, console)
    return res


def _print(res: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="attacks on a TLS + token tier (goal: served 0)")
    for c in ("attack", "attempts", "refused", "served"):
        t.add_column(c)
    for name, r in res["attacks"].items():
        t.add_row(name, str(r["attempts"]), str(r["refused"]), str(r["served"]))
    console.print(t)
    f = res["fuzz"]
    console.print(f"fuzz: {f['cases']} cases, {f['unclear_answers']} unclear answers, "
                  f"{f['server_crashes']} server crashes, data kept: {f['data_kept']}")
    ld = res["load"]
    console.print(
        f"load: {ld['clients']} clients x {ld['ops_per_client']} ops in {ld['seconds']:.1f}s, "
        f"errors {ld['errors']}, p99 {ld['p99_ms_all']:.1f} ms ("
        + ", ".join(f"{op} {v:.1f}" for op, v in ld["p99_ms"].items())
        + f"), peak RSS {ld['rss_peak_bytes'] >> 20} MiB (idle {ld['rss_baseline_bytes'] >> 20}"
        f" MiB), growth {100 * ld['rss_growth_vs_capacity']:.1f}% of capacity "
        f"{ld['capacity_bytes'] >> 20} MiB (goal <= 105%), store {ld['store_bytes'] >> 20} MiB, "
        f"{ld['evictions']} evictions")
    r = res["restart"]
    console.print(f"fault warm restart: {r['completed']} reads completed, {r['failed']} failed "
                  f"while down, wrong bytes {r['wrong_bytes']}, recovered in "
                  f"{r['seconds_to_recover']:.2f}s, entries {r['entries_after']}/"
                  f"{r['entries_before']}" if r["seconds_to_recover"] is not None else
                  f"fault warm restart: not recovered ({r})")


if __name__ == "__main__":  # pragma: no cover
    from rich.console import Console

    run_reliability_bench(console=Console())
