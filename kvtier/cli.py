"""``kvtier``: run the tier server and administer any tier (server or Redis URL).

Every admin command takes ``--url`` (default ``$KVTIER_URL`` or
grpc://127.0.0.1:7070) and ``--json`` for scripts; people get tables.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kvtier.backends import Backend, BackendError, open_backend
from kvtier.config import ConfigError, ServerConfig, load_config

app = typer.Typer(help="kvtier: a shared KV + recurrent-state cache tier for hybrid models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="KVTIER_URL",
                                  help="tier: grpc://HOST:PORT, redis://..., redis+cluster://...")]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Namespace = Annotated[str | None, typer.Option("--namespace", "-n",
                                                help="namespace id (hex, see `kvtier ls`)")]
DEFAULT_URL = "grpc://127.0.0.1:7070"
BATCH = 512


def fail(msg: str, code: int = 1) -> NoReturn:
    # One line whatever the terminal width; the message is text, not markup (keys and
    # user input may hold brackets).
    err.print(f"[red]error:[/red] {escape(msg)}", soft_wrap=True)
    raise typer.Exit(code)


def connect(url: str) -> Backend:
    try:
        return open_backend(url)
    except (ValueError, ConfigError) as e:
        fail(str(e), 2)


def emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        out.print(table)
    else:
        out.print(data)


# -- serve / health ------------------------------------------------------------------------
@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0: any free port)")] = 7070,
    capacity: Annotated[str, typer.Option(help="memory store size, e.g. 4GiB")] = "4GiB",
    backend: Annotated[str, typer.Option(help="memory (embedded, default) or redis")] = "memory",
    redis_url: Annotated[str | None, typer.Option(help="for --backend redis")] = None,
    eviction: Annotated[str, typer.Option(help="store eviction: value, lru, fifo")] = "value",
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = None,
    bulk_port: Annotated[int, typer.Option(
        help="raw-TCP bulk read port (0: any free port; -1: off)")] = 0,
    snapshot_dir: Annotated[str | None, typer.Option(
        help="warm restart: load the memory store from this directory at start, "
        "write it there on shutdown")] = None,
    snapshot_interval: Annotated[float, typer.Option(
        help="also snapshot every N seconds when the store changed (0: only on shutdown)")] = 0,
    tls_cert: Annotated[str | None, typer.Option(
        help="PEM certificate: serve TLS on gRPC and the bulk port (clients use grpcs://)")] = None,
    tls_key: Annotated[str | None, typer.Option(help="PEM key of --tls-cert")] = None,
    tls_client_ca: Annotated[str | None, typer.Option(
        help="mutual TLS: require client certificates signed by this CA")] = None,
    auth_token_file: Annotated[str | None, typer.Option(
        help="bearer tokens bound to tenants and roles (JSON; re-read on SIGHUP/change)")] = None,
    stream_idle: Annotated[float, typer.Option(
        help="cancel an upload stream idle this many seconds (stalled client); 0: never")] = 30,
    bulk_max_connections: Annotated[int, typer.Option(
        help="bulk port connections at once (more: closed, clients read over gRPC)")] = 512,
    max_message: Annotated[str, typer.Option(
        help="largest gRPC message accepted, e.g. 64MiB (bounds a request's allocation)")]
    = "64MiB",
    nixl: Annotated[bool | None, typer.Option(
        "--nixl/--no-nixl", help="NIXL data plane (default: on when nixl imports, memory "
        "backend, no TLS)")] = None,
) -> None:
    """Run the tier server (the main job). The embedded in-memory store is the default."""
    import logging

    from kvtier.security.limits import return_freed_payloads
    from kvtier.server.grpc_server import run_server

    return_freed_payloads()  # evicted payloads go back to the OS: RSS stays near capacity

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_config(ServerConfig, dict(
            host=host, port=port, capacity=capacity, backend=backend, redis_url=redis_url,
            eviction=eviction, metrics_port=metrics_port,
            bulk_port=None if bulk_port < 0 else bulk_port, snapshot_dir=snapshot_dir,
            snapshot_interval_s=snapshot_interval, tls_cert=tls_cert, tls_key=tls_key,
            tls_client_ca=tls_client_ca, auth_token_file=auth_token_file,
            stream_idle_s=stream_idle, bulk_max_connections=bulk_max_connections,
            max_message_bytes=max_message, nixl=nixl))
    except ConfigError as e:
        fail(str(e), 2)
    try:
        run_server(cfg)
    except (OSError, ConfigError) as e:  # a busy port, an unusable token file or certificate
        fail(str(e), 1)


@app.command()
def health(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Exit 0 if the tier answers, 1 (with the reason) if not."""
    try:
        with connect(url) as b:
            h = b.health()
    except BackendError as e:
        if as_json:
            emit({"ok": False, "url": url, "error": str(e)}, True)
            raise typer.Exit(1) from None
        fail(str(e))
    h = {"url": url, **h}
    emit(h, as_json)
    raise typer.Exit(0 if h.get("ok") else 1)


def _urls(values: list[str]) -> list[str]:
    return [u for v in values for u in v.replace(",", " ").split()]


@app.command()
def router(
    prefill: Annotated[list[str], typer.Option(
        help="prefill vLLM server URL (repeat, or comma-separated)")],
    decode: Annotated[list[str], typer.Option(
        help="decode vLLM server URL (repeat, or comma-separated)")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    health_interval: Annotated[float, typer.Option(help="seconds between /health checks")] = 5.0,
    prefill_timeout: Annotated[float, typer.Option(help="seconds a prefill may take")] = 300.0,
    decode_timeout: Annotated[float, typer.Option(
        help="seconds until decode answers, and between streamed chunks")] = 300.0,
    affinity_chars: Annotated[int, typer.Option(
        help="prompt characters that pick a preferred prefill node (0: off)")] = 1024,
    affinity_slack: Annotated[int, typer.Option(
        help="extra in-flight requests a preferred prefill node may have")] = 2,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the OpenAI-compatible prefill/decode router (vLLM's PD protocol)."""
    from kvtier.router import RouterConfig, run

    try:
        cfg = RouterConfig(prefill=_urls(prefill), decode=_urls(decode),
                           health_interval_s=health_interval, prefill_timeout_s=prefill_timeout,
                           decode_timeout_s=decode_timeout, affinity_chars=affinity_chars,
                           affinity_slack=affinity_slack)
        run(cfg, host, port, log_level)
    except (ValueError, OSError) as e:
        fail(str(e), 2)


# -- read-only admin ------------------------------------------------------------------------
@app.command()
def stats(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Occupancy, capacity, hits, misses, evictions."""
    try:
        with connect(url) as b:
            s = b.stats().as_dict()
    except BackendError as e:
        fail(str(e))
    t = Table(title=f"kvtier stats — {url}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in s.items():
        if k == "extra":
            for k2, v2 in v.items():
                t.add_row(k2, str(v2))
        else:
            t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    emit(s, as_json, t)


def _manifests(b: Backend) -> dict[str, Any]:
    from kvtier.manifest import load_manifests

    return load_manifests(b)


@app.command("ls")
def ls_(url: Url = DEFAULT_URL, namespace: Namespace = None,
        limit: Annotated[int, typer.Option(min=1, help="blocks to list with --namespace")] = 50,
        as_json: Json = False) -> None:
    """Namespaces (model, layout, blocks, bytes) or, with --namespace, their blocks."""
    from kvtier.keys import BlockKey, is_manifest_key, namespace_prefix

    try:
        with connect(url) as b:
            if namespace:
                ns = _ns_bytes(namespace)
                rows = []
                known = False
                for e in b.scan(namespace_prefix(ns), limit=None):
                    known = True
                    if is_manifest_key(e.key):
                        continue
                    k = BlockKey.decode(e.key)
                    rows.append({"key": e.key.decode(), "rank": k.rank, "group": k.group,
                                 "hash": k.block_hash.hex(), "bytes": e.size,
                                 "pinned": e.pinned})
                    if len(rows) >= limit:
                        break
                if not known:
                    fail(f"namespace {namespace} is not in this tier (see `kvtier ls`)", 2)
                t = Table(title=f"blocks of {namespace}")
                for c in ("group", "rank", "hash", "bytes", "pinned"):
                    t.add_column(c)
                for r in rows:
                    t.add_row(str(r["group"]), str(r["rank"]), r["hash"][:16], f"{r['bytes']:,}",
                              "yes" if r["pinned"] else "")
                emit(rows, as_json, t)
                return
            manifests = _manifests(b)
            agg: dict[str, dict[str, Any]] = defaultdict(lambda: {"blocks": 0, "bytes": 0,
                                                                  "groups": set()})
            for k, e in b.scan_blocks():
                a = agg[k.namespace.hex()]
                a["blocks"] += 1
                a["bytes"] += e.size
                a["groups"].add(k.group)
    except BackendError as e:
        fail(str(e))
    rows = []
    for ns in sorted(set(agg) | set(manifests)):
        m = manifests.get(ns)
        a = agg.get(ns, {"blocks": 0, "bytes": 0, "groups": set()})
        rows.append({"namespace": ns, "model": m.model if m else None,
                     "boundary_tokens": m.boundary_tokens if m else None,
                     "groups": sorted(a["groups"]), "blocks": a["blocks"], "bytes": a["bytes"]})
    t = Table(title=f"kvtier namespaces — {url}")
    # The namespace is what `-n` takes: never truncate it.
    t.add_column("namespace", no_wrap=True, min_width=32)
    for c in ("model", "boundary", "groups", "blocks", "bytes"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["namespace"], str(r["model"] or "?"), str(r["boundary_tokens"] or "?"),
                  ",".join(map(str, r["groups"])), f"{r['blocks']:,}", f"{r['bytes']:,}")
    emit(rows, as_json, t)


def _ns_bytes(namespace: str) -> bytes:
    try:
        ns = bytes.fromhex(namespace)
    except ValueError:
        fail(f"--namespace must be hex (see `kvtier ls`), got {namespace!r}", 2)
    if len(ns) != 16:
        fail(f"--namespace must be 32 hex digits, got {len(namespace)}", 2)
    return ns


@app.command()
def inspect(key: Annotated[str, typer.Argument(help="a block key (see `kvtier ls -n NS`)")],
            url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Decode one stored block: its header (decode-written or not), and whether its checksum
    holds."""
    from kvtier import payload
    from kvtier.keys import BlockKey

    try:
        k = BlockKey.decode(key)
    except ValueError as e:
        fail(str(e), 2)
    try:
        with connect(url) as b:
            (v,) = b.get_many([key.encode()])
    except BackendError as e:
        fail(str(e))
    if v is None:
        fail(f"no block stored under {key}")
    info: dict[str, Any] = {"key": key, "namespace": k.namespace.hex(), "rank": k.rank,
                            "group": k.group, "hash": k.block_hash.hex(), "stored_bytes": len(v)}
    try:
        h = payload.read_header(v)
        info.update(format_version=h.version, layout=h.layout.hex(), data_bytes=h.length,
                    checksum=f"{h.checksum:016x}", key_matches=h.key == k,
                    # Decode-written: restores equivalently, not bit-identically (README).
                    decode=bool(h.flags & payload.FLAG_DECODE))
        payload.decode(v, k)
        info["valid"] = True
    except payload.PayloadError as e:
        info.update(valid=False, problem=str(e))
    t = Table(title="block")
    t.add_column("field")
    t.add_column("value", overflow="fold")
    for f, val in info.items():
        t.add_row(f, str(val))
    emit(info, as_json, t)
    if not info["valid"]:
        raise typer.Exit(1)


@app.command()
def explain(
    url: Url = DEFAULT_URL,
    namespace: Namespace = None,
    prompt: Annotated[str | None, typer.Option(help="prompt text (needs --tokenizer)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer dir for --prompt")] = None,
    token_ids: Annotated[str | None, typer.Option(help="comma-separated token ids")] = None,
    token_file: Annotated[Path | None, typer.Option(help="JSON list of token ids")] = None,
    as_json: Json = False,
) -> None:
    """Why a prompt would hit or miss, boundary by boundary."""
    from kvtier.explain import explain_prompt

    ids = _token_ids(prompt, tokenizer, token_ids, token_file)
    try:
        with connect(url) as b:
            manifests = _manifests(b)
            if namespace is None:
                if len(manifests) != 1:
                    choices = ", ".join(f"{n} ({m.model})" for n, m in manifests.items())
                    fail("choose the namespace with --namespace: "
                         + (choices or "the tier holds no namespace manifest yet"), 2)
                namespace = next(iter(manifests))
            if namespace not in manifests:
                fail(f"namespace {namespace} has no manifest in this tier (see `kvtier ls`)", 2)
            report = explain_prompt(b, manifests[namespace], ids, manifests=manifests)
    except BackendError as e:
        fail(str(e))
    t = Table(title=f"explain: {len(ids)} tokens, namespace {namespace}")
    t.add_column("boundary")
    t.add_column("tokens", justify="right")
    for g in report["groups"]:
        t.add_column(f"g{g['group_id']} {g['kind']}")
    t.add_column("restorable")
    for row in report["boundaries"]:
        t.add_row(str(row["boundary"]), str(row["tokens"]),
                  *["✓" if p else "✗" for p in row["present"]],
                  "yes" if row["restorable"] else "no")
    emit(report, as_json, t)
    if not as_json:
        out.print(f"hit the connector would report: [bold]{report['hit_tokens']}[/bold] tokens "
                  f"— {report['why']}")


def _token_ids(prompt: str | None, tokenizer: str | None, token_ids: str | None,
               token_file: Path | None) -> list[int]:
    given = [x is not None for x in (prompt, token_ids, token_file)]
    if sum(given) != 1:
        fail("give exactly one of --prompt (with --tokenizer), --token-ids, --token-file", 2)
    if token_ids is not None:
        try:
            return [int(t) for t in token_ids.replace(" ", "").split(",") if t]
        except ValueError:
            fail("--token-ids must be comma-separated integers", 2)
    if token_file is not None:
        try:
            ids = json.loads(token_file.read_text())
            assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
            return ids
        except (OSError, ValueError, AssertionError):
            fail(f"{token_file} must hold a JSON list of token ids", 2)
    if tokenizer is None:
        fail("--prompt needs --tokenizer (the model directory or tokenizer name)", 2)
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(tokenizer).encode(prompt))


# -- mutating admin -------------------------------------------------------------------------
def _select(b: Backend, keys: list[str], namespace: str | None) -> list[bytes]:
    from kvtier.keys import BlockKey, is_manifest_key, namespace_prefix

    if bool(keys) == bool(namespace):
        fail("give block keys or --namespace (not both)", 2)
    if namespace:
        found = [e.key for e in b.scan(namespace_prefix(_ns_bytes(namespace)))]
        if not found:
            fail(f"namespace {namespace} is not in this tier (see `kvtier ls`)", 2)
        # Blocks only: the manifest stays, so `ls` and `explain` still know the namespace.
        return [k for k in found if not is_manifest_key(k)]
    for k in keys:
        try:
            BlockKey.decode(k)
        except ValueError as e:
            fail(str(e), 2)
    return [k.encode() for k in keys]


def _batched(label: str, keys: list[bytes], fn, as_json: bool) -> int:  # noqa: ANN001
    done = 0
    with Progress(console=err, disable=as_json or len(keys) <= BATCH) as progress:
        task = progress.add_task(label, total=len(keys))
        for i in range(0, len(keys), BATCH):
            done += fn(keys[i:i + BATCH])
            progress.advance(task, min(BATCH, len(keys) - i))
    return done


@app.command()
def evict(keys: Annotated[list[str] | None, typer.Argument(help="block keys")] = None,
          url: Url = DEFAULT_URL, namespace: Namespace = None, as_json: Json = False) -> None:
    """Delete blocks now (a later lookup stops before them)."""
    try:
        with connect(url) as b:
            sel = _select(b, keys or [], namespace)
            n = _batched("evicting", sel, b.delete_many, as_json)
    except BackendError as e:
        fail(str(e))
    emit({"evicted": n, "asked": len(sel)}, as_json)


def _pin(keys: list[str] | None, url: str, namespace: str | None, as_json: bool,
         pinned: bool) -> None:
    try:
        with connect(url) as b:
            sel = _select(b, keys or [], namespace)
            n = _batched("pinning" if pinned else "unpinning", sel,
                         lambda ks: b.pin(ks, pinned), as_json)
    except BackendError as e:
        fail(str(e))
    emit({"pinned" if pinned else "unpinned": n, "asked": len(sel)}, as_json)


@app.command()
def pin(keys: Annotated[list[str] | None, typer.Argument(help="block keys")] = None,
        url: Url = DEFAULT_URL, namespace: Namespace = None, as_json: Json = False) -> None:
    """Exempt blocks from eviction."""
    _pin(keys, url, namespace, as_json, True)


@app.command()
def unpin(keys: Annotated[list[str] | None, typer.Argument(help="block keys")] = None,
          url: Url = DEFAULT_URL, namespace: Namespace = None, as_json: Json = False) -> None:
    """Make pinned blocks evictable again."""
    _pin(keys, url, namespace, as_json, False)


@app.command()
def flush(url: Url = DEFAULT_URL, namespace: Namespace = None,
          yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
          as_json: Json = False) -> None:
    """Drop every kvtier block (of one namespace, with --namespace). Asks first."""
    from kvtier.keys import namespace_prefix

    prefix = namespace_prefix(_ns_bytes(namespace)) if namespace else namespace_prefix()
    what = f"namespace {namespace}" if namespace else "ALL kvtier blocks"
    if not yes:
        if not sys.stdin.isatty():
            fail(f"refusing to flush {what} without confirmation: pass --yes", 2)
        # The question goes to stderr: stdout stays clean for --json.
        if not typer.confirm(f"Flush {what} from {url}?", err=True):
            raise typer.Exit(1)
    try:
        with connect(url) as b:
            n = b.flush(prefix)
    except BackendError as e:
        fail(str(e))
    emit({"flushed": n}, as_json)


@app.command()
def bench(
    which: Annotated[str, typer.Argument(
        help="grpc, redis, ttft, pd, admission, nixl, reliability or all (all: grpc + redis)")]
    = "all",
    redis_url: Annotated[str | None, typer.Option(help="existing Redis (else started)")] = None,
    clients: Annotated[int, typer.Option(help="reliability: load client processes")] = 32,
    ops: Annotated[int, typer.Option(help="reliability: ops per load client")] = 10_000,
    capacity: Annotated[str, typer.Option(help="reliability: store capacity")] = "2GiB",
    as_json: Json = False,
) -> None:
    """Tier benchmarks, printed beside raw references measured in the same run."""
    results: dict[str, Any] = {}
    if which in ("grpc", "all"):
        from kvtier.benches.grpc import run_grpc_bench

        results["grpc"] = run_grpc_bench(console=None if as_json else out)
    if which in ("redis", "all"):
        from kvtier.benches.redis import run_redis_bench

        results["redis"] = run_redis_bench(redis_url) if redis_url else run_redis_bench()
    if which == "ttft":
        from kvtier.benches.ttft import run_ttft_bench

        results["ttft"] = run_ttft_bench(console=None if as_json else out)
    if which == "pd":
        from kvtier.benches.pd import run_pd_bench

        results["pd"] = run_pd_bench(console=None if as_json else out)
    if which == "admission":
        from kvtier.benches.admission import run_admission_bench

        results["admission"] = run_admission_bench(console=None if as_json else out)
    if which == "nixl":
        from kvtier.benches.nixl import run_nixl_bench

        results["nixl"] = run_nixl_bench(console=None if as_json else out)
    if which == "reliability":
        from kvtier.benches.reliability import run_reliability_bench

        results["reliability"] = run_reliability_bench(
            clients, ops, capacity=capacity, console=None if as_json else out)
    if not results:
        fail(f"unknown benchmark {which!r}: use grpc, redis, ttft, pd, admission, nixl, "
             "reliability or all", 2)
    if as_json:
        emit(results, True)


@app.command()
def sim(
    trace: Annotated[str | None, typer.Option(help="JSONL trace file (format: README)")] = None,
    gen: Annotated[str | None, typer.Option(help="chat, agentic, sysprompt or mix")] = None,
    requests: Annotated[int, typer.Option(help="requests to generate with --gen")] = 400,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    model: Annotated[str, typer.Option(
        help="qwen3-next-80b, nemotron-h-56b or qwen3.5-35b")] = "qwen3-next-80b",
    capacity: Annotated[str, typer.Option(help="tier size: bytes (8GiB) or % of working set")]
    = "20%",
    admission: Annotated[str, typer.Option(help="dense, prompt_end, marconi, default")]
    = "default",
    eviction: Annotated[str, typer.Option(
        help="lru, fifo, value, or clairvoyant (knows the trace's future: a reference)")]
    = "value",
    chunk_tokens: Annotated[int, typer.Option(help="vLLM's prefill chunk budget")] = 8192,
    in_chunk: Annotated[bool, typer.Option(
        help="vLLM writes states inside a chunk (no chunk end moved)")] = False,
    as_json: Json = False,
) -> None:
    """Replay a trace through the real keys, lookup, admission and eviction code (no engine)."""
    from kvtier.sim import report

    try:
        loaded = report.load(trace, gen, model, requests, seed)
        res = report.run(loaded, capacity, admission, eviction, chunk_tokens, in_chunk)
    except (ValueError, OSError) as e:
        fail(str(e), 2)
    table = Table(title=f"kvtier sim: {res['trace']} on {res['model']}, "
                        f"{admission} + {eviction}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, k, how in report.ROWS:
        table.add_row(label, report.fmt(res[k], how))
    emit(res, as_json, table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
