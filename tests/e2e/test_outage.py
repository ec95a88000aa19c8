"""An engine whose tier is down reports an outage, not a miss, and serves right tokens."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import free_port
from kvtier.testing.tiny_model import make_prompt_token_ids

pytestmark = pytest.mark.engine


def _samples(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_lookup_against_a_dead_tier_counts_as_an_outage(model_path, cold):
    metrics = free_port()
    dead = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    eng = EngineProcess(engine_kwargs(model_path, dead, metrics_port=metrics), "dead-tier")
    try:
        p = make_prompt_token_ids(1000, 9201, 4096)
        out = eng.generate(p)
        assert out.token_ids == cold.generate(p).token_ids
        assert out.num_cached_tokens == 0
        stats = eng.connector_stats()
        assert stats.get("lookup_miss:tier_unavailable", 0) == 1, stats
        assert not stats.get("lookup_miss:nothing_to_look_up"), stats
        assert sum(v for k, v in stats.items() if k.startswith("tier_errors_")) >= 1, stats
        assert stats["tier_down_scheduler"] == 1, stats
        s = _samples(metrics)
        assert s[("kvtier_connector_lookups_total",
                  frozenset({"outcome": "miss", "reason": "tier_unavailable"}.items()))] == 1
        assert s[("kvtier_connector_tier_down", frozenset({"client": "scheduler"}.items()))] == 1
        assert sum(v for (name, _), v in s.items()
                   if name == "kvtier_connector_tier_errors_total") >= 1
        log = eng.tail(400)
        assert "tier unavailable" in log and "vanished" not in log
    finally:
        eng.close()
