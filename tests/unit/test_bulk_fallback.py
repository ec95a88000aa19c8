"""Bulk-port reads fall back to gRPC streaming when the bulk plane fails, on a real
``kvtier serve`` process whose bulk listener (or its connections) is killed from
outside (:func:`kvtier.testing.faults.close_tcp_port`); its gRPC port keeps serving."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey, Namespace
from kvtier.testing.faults import close_tcp_port
from kvtier.testing.tier_proc import TierProcess, free_port
from tests.helpers.servers import server_log

LAYOUT = payload.layout_digest("bulk-fallback-test")
RETRY_S = 0.5


def _served(metrics_port: int) -> dict[str, float]:
    """Successful reads the server answered, by path ("bulk_get" or gRPC "get")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"bulk_get": 0.0, "get": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "kvtier_requests_total" and s.labels.get("code") == "OK" \
                    and s.labels.get("method") in out:
                out[s.labels["method"]] = s.value
    return out


@pytest.fixture
def tier() -> Iterator[tuple[TierProcess, int]]:
    port = free_port()
    with TierProcess(capacity="256MiB", extra_args=("--metrics-port", str(port))) as t:
        yield t, port


@pytest.fixture
def stored(tier: tuple[TierProcess, int]) -> tuple[list[bytes], list[bytes]]:
    ns = Namespace("bulk-fallback", "layout", os.urandom(4).hex()).id
    items = []
    for i in range(24):  # 24 x 1 MiB: several gRPC streams on the fallback
        k = BlockKey(ns, 0, 3, i.to_bytes(4, "little") * 8)
        items.append(PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(1 << 20))))
    with GrpcBackend(tier[0].url, timeout_s=10) as b:
        assert b.put_many(items) == len(items)
    return [it.key for it in items], [it.value for it in items]


def _read(client: GrpcBackend, keys: list[bytes], values: list[bytes]) -> None:
    got = client.get_many([*keys, b"kvt1:" + b"0" * 32 + b":0:3:00"])
    assert got[-1] is None
    assert [bytes(v) for v in got[:-1]] == values  # byte-exact, in order


def test_reads_fall_back_to_grpc_when_the_bulk_listener_dies(
        tier: tuple[TierProcess, int], stored: tuple[list[bytes], list[bytes]],
        caplog: pytest.LogCaptureFixture) -> None:
    tp, metrics = tier
    keys, values = stored
    client = GrpcBackend(tp.url, timeout_s=10, bulk_retry_s=RETRY_S)
    _read(client, keys, values)
    assert _served(metrics) == {"bulk_get": 1, "get": 0}  # the bulk port served it
    bulk_port = client.health()["bulk_port"]
    assert tp.proc is not None
    # the listener and the connection it accepted from `client`
    assert close_tcp_port(tp.proc.pid, bulk_port) >= 2
    with caplog.at_level(logging.WARNING, logger="kvtier.grpc"):
        _read(client, keys, values)
    assert client.bulk_fallbacks == 1
    assert "falling back to gRPC streaming" in caplog.text
    assert _served(metrics)["get"] >= 1  # gRPC streaming served it, the bulk port did not
    assert _served(metrics)["bulk_get"] == 1
    # The server saw its listener die and stops advertising it; new clients and this
    # one (once it asks again) read over gRPC without a failed attempt.
    deadline = time.monotonic() + 10
    while client.health()["bulk_port"] != 0:
        assert time.monotonic() < deadline, server_log(tp)
        time.sleep(0.1)
    assert "bulk listener on port" in server_log(tp)
    with GrpcBackend(tp.url, timeout_s=10) as fresh:
        _read(fresh, keys, values)
        assert fresh.bulk_fallbacks == 0
    time.sleep(RETRY_S)
    _read(client, keys, values)
    assert client.bulk_fallbacks == 1
    assert _served(metrics)["bulk_get"] == 1
    client.close()


def test_bulk_is_retried_after_its_connection_fails(
        tier: tuple[TierProcess, int], stored: tuple[list[bytes], list[bytes]]) -> None:
    tp, metrics = tier
    keys, values = stored
    client = GrpcBackend(tp.url, timeout_s=10, bulk_retry_s=RETRY_S)
    _read(client, keys, values)
    assert tp.proc is not None
    assert close_tcp_port(tp.proc.pid, client.health()["bulk_port"], listener=False) == 1
    _read(client, keys, values)  # connection closed under it: gRPC
    _read(client, keys, values)  # within bulk_retry_s: gRPC straight away
    assert client.bulk_fallbacks == 1
    assert _served(metrics) == {"bulk_get": 1, "get": 2}
    time.sleep(RETRY_S)
    _read(client, keys, values)  # the listener is alive: back on the bulk port
    assert _served(metrics) == {"bulk_get": 2, "get": 2}
    assert client.bulk_fallbacks == 1
    client.close()
