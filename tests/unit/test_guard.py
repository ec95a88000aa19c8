"""GuardedBackend against a real tier server that dies and comes back: outages are
reported as outages (never as misses), counted by operation and exported."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import generate_latest

from kvtier.backends.base import PutItem
from kvtier.backends.guard import GuardedBackend
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery, StopReason
from kvtier.testing.tier_proc import TierProcess, free_port
from tests.helpers import bad_entries

GROUPS = [GroupQuery(0, GroupKind.STATE), GroupQuery(3, GroupKind.ATTENTION)]


def _query(ns: bytes) -> LookupQuery:
    return LookupQuery(ns, 0, [b"h" * 32, b"i" * 32], 1, GROUPS)


def _block() -> tuple[bytes, bytes]:
    key = bad_entries.block_key(3)
    return key.encode(), bad_entries.good(key)


def test_dead_tier_is_an_outage_not_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    ns = bad_entries.block_key().namespace
    g = GuardedBackend(f"grpc://127.0.0.1:{free_port()}", timeout_s=0.5, retry_after_s=0)
    with caplog.at_level(logging.WARNING, logger="kvtier.connector"):
        r = g.lookup(_query(ns))
    assert (r.boundary, r.reason) == (0, StopReason.TIER_UNAVAILABLE)
    assert g.get_many([b"kvt1:x"]) is None  # not [None]: nothing is known about the block
    assert g.put_many([PutItem(*_block())]) is None
    assert g.down is True
    assert dict(g.errors) == {"lookup": 1, "get": 1, "put": 1}
    assert "tier unavailable" in caplog.text and "vanished" not in caplog.text


def test_outage_then_recovery_on_a_real_server(caplog: pytest.LogCaptureFixture) -> None:
    tier = TierProcess(capacity="64MiB").start()
    try:
        g = GuardedBackend(tier.url, timeout_s=1.0, retry_after_s=0.3)
        k, v = _block()
        assert g.put_many([PutItem(k, v)]) == 1
        assert g.get_many([k, b"kvt1:" + b"0" * 32 + b":0:3:00"]) == [v, None]  # a miss
        assert g.lookup(_query(bad_entries.block_key().namespace)).reason \
            is not StopReason.TIER_UNAVAILABLE
        assert g.down is False and not g.errors
        tier.kill()
        assert g.get_many([k]) is None
        assert (g.down, dict(g.errors)) == (True, {"get": 1})
        # backing off: answered as an outage without calling (no new error)
        assert g.lookup(_query(bad_entries.block_key().namespace)).reason \
            is StopReason.TIER_UNAVAILABLE
        assert dict(g.errors) == {"get": 1}
        tier.start()
        deadline = time.monotonic() + 15
        with caplog.at_level(logging.INFO, logger="kvtier.connector"):
            while (got := g.get_many([k])) is None:
                assert time.monotonic() < deadline, "the guard never used the tier again"
                time.sleep(0.2)
        assert got == [None]  # a fresh (empty) server: now a real miss
        assert g.down is False
        assert "tier available again" in caplog.text
        g.close()
    finally:
        tier.kill()


def test_outages_are_exported_by_op_and_client() -> None:
    from kvtier.connectors.vllm.stats import ConnectorStats

    stats = ConnectorStats()
    dead = GuardedBackend(f"grpc://127.0.0.1:{free_port()}", timeout_s=0.5, retry_after_s=0)
    fine = GuardedBackend("memory://guard-test", timeout_s=0.5, retry_after_s=0)
    stats.watch_tier("scheduler", dead)
    stats.watch_tier("upload", fine)
    dead.lookup(_query(bad_entries.block_key().namespace))
    dead.lookup(_query(bad_entries.block_key().namespace))
    dead.get_many([b"kvt1:x"])
    assert fine.put_many([PutItem(*_block())]) == 1
    snap = stats.snapshot()
    assert snap["tier_errors_lookup"] == 2 and snap["tier_errors_get"] == 1
    assert (snap["tier_down_scheduler"], snap["tier_down_upload"]) == (1, 0)
    text = generate_latest(stats.registry).decode()
    assert 'kvtier_connector_tier_errors_total{op="lookup"} 2.0' in text
    assert 'kvtier_connector_tier_down{client="scheduler"} 1.0' in text
    assert 'kvtier_connector_tier_down{client="upload"} 0.0' in text
    assert "kvtier_connector_bulk_fallbacks_total 0.0" in text
