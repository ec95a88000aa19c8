"""Every connector option the README documents, exercised on real engines.

One tier server of this module's own (``--bulk-port -1``: every read streams over
gRPC) and three engines that share it, each carrying the options under test:

- W: tenant "A", ``load=false``, ``checkpoint_every=2`` -- the writer;
- R: tenant "A", ``save=false``, behind a latency proxy (``timeout_s``,
  ``retry_after_s``) -- the reader;
- B: tenant "B", ``checkpoint_every=0``, ``save_decode=false``.

``memory://`` and ``rediss://`` + ACL get an engine each, started by their test.
The token reference is W: with ``load=false`` and its local prefix cache emptied
before every request, it computes every prompt from scratch (a cold run with the
same engine settings), and it never reads what other engines stored.
Saves land in the background: a test that needs one waits on the tier from
outside (``wait_restorable``). One engine's uploads go through one FIFO queue, so
once a later prompt of the same engine is restorable, everything it saved
before has landed -- that is how a test proves something was *not* stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvtier import payload
from kvtier.backends import open_backend
from kvtier.explain import explain_prompt
from kvtier.keys import Namespace
from kvtier.manifest import load_manifests
from kvtier.testing.delay_proxy import DelayProxy
from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess, free_port
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import scrape_metrics, wait_restorable, wait_until
from tests.e2e.conftest import BLOCK, STATE_GROUPS, deepest_boundary

pytestmark = pytest.mark.engine
RETRY_S = 30.0  # R's retry_after_s: long enough to look inside the window on a busy box
START_S = 900.0  # engine start deadline: generous, the box is shared
SLOW_S = 3.0  # proxy latency per direction while the tier is "slow" (R's timeout_s is 2)


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, 4096)


def engine(kwargs: dict[str, Any], name: str) -> EngineProcess:
    return EngineProcess(kwargs, name, start_timeout_s=START_S)


@dataclass
class Options:
    tier: TierProcess
    proxy: DelayProxy
    metrics_port: int
    w: EngineProcess
    r: EngineProcess
    b: EngineProcess

    def namespace(self, tenant: str) -> str:
        """Namespace hex of ``tenant`` (all engines here share one model and layout)."""
        with open_backend(self.tier.url) as t:
            m = next(iter(load_manifests(t).values()))
        return Namespace(m.model, m.layout, tenant).hex

    def report(self, tokens: list[int], tenant: str) -> dict[str, Any]:
        """``kvtier explain`` of ``tokens`` in ``tenant``'s namespace."""
        ns = self.namespace(tenant)
        with open_backend(self.tier.url) as t:
            return explain_prompt(t, load_manifests(t)[ns], tokens)

    def restorable(self, tokens: list[int], n: int, tenant: str) -> dict[str, Any]:
        return wait_restorable(self.tier.url, tokens, n, timeout_s=60,
                               namespace=self.namespace(tenant))


@pytest.fixture(scope="module")
def opts(model_path: Path) -> Iterator[Options]:
    metrics_port = free_port()
    with TierProcess(extra_args=("--bulk-port", "-1", "--metrics-port", str(metrics_port))) as t, \
            DelayProxy(f"127.0.0.1:{t.port}") as proxy:
        engines = {
            "w": engine(engine_kwargs(model_path, t.url, tenant="A", load=False,
                                             checkpoint_every=2), "opt-w"),
            "r": engine(engine_kwargs(model_path, f"grpc://{proxy.address()}",
                                             tenant="A", save=False, timeout_s=2.0,
                                             retry_after_s=RETRY_S), "opt-r"),
            "b": engine(engine_kwargs(model_path, t.url, tenant="B", checkpoint_every=0,
                                             save_decode=False), "opt-b"),
        }
        try:
            for e in engines.values():
                e.wait_ready()
            yield Options(t, proxy, metrics_port, **engines)
        finally:
            for e in engines.values():
                e.close()


def lookups(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.startswith("lookup_")}


def state_boundaries(report: dict[str, Any]) -> set[int]:
    """Boundaries at which every recurrent-state group is stored."""
    kinds = [g["kind"] for g in report["groups"]]
    return {row["boundary"] for row in report["boundaries"]
            if all(p for p, k in zip(row["present"], kinds) if k == "state")}


def test_tenant_hits_only_its_own_blocks(opts: Options):
    p = prompt(2000, seed=401)
    ref = opts.w.generate(p)  # W saves it under tenant A
    opts.restorable(p, deepest_boundary(len(p)), "A")
    before = lookups(opts.b.connector_stats())
    other = opts.b.generate(p)
    assert (other.num_cached_tokens, other.token_ids) == (0, ref.token_ids)
    after = lookups(opts.b.connector_stats())
    assert sum(after.values()) == sum(before.values()) + 1, "B asked the tier, and missed"
    assert after.get("lookup_hit", 0) == before.get("lookup_hit", 0)
    same = opts.r.generate(p)
    assert (same.num_cached_tokens, same.token_ids) == (deepest_boundary(len(p)), ref.token_ids)


def test_bulk_port_off_restores_over_grpc_streaming(opts: Options):
    with open_backend(opts.tier.url) as t:
        assert t.health()["bulk_port"] == 0, "--bulk-port -1 advertises no bulk port"
    p = prompt(1500, seed=402)
    ref = opts.w.generate(p)
    opts.restorable(p, deepest_boundary(len(p)), "A")
    before = scrape_metrics(opts.metrics_port)
    hit = opts.r.generate(p)
    after = scrape_metrics(opts.metrics_port)
    assert (hit.num_cached_tokens, hit.token_ids) == (deepest_boundary(len(p)), ref.token_ids)
    grpc_gets = ("kvtier_requests_total", (("code", "OK"), ("method", "get")))
    assert after.get(grpc_gets, 0) > before.get(grpc_gets, 0)
    assert not [k for k in after if ("method", "bulk_get") in k[1]], "no bulk reads at all"


def test_checkpoint_every_2_and_0(opts: Options):
    """N=2 stores a state every 2 boundaries (and vLLM's own at the last one); N=0
    only vLLM's own (N=N is admission=dense, every=N)."""
    p = prompt(2000, seed=403)
    opts.w.generate(p)
    S, last = BLOCK, deepest_boundary(len(p)) // BLOCK
    assert state_boundaries(opts.restorable(p, last * S, "A")) == {*range(2, last + 1, 2), last}
    q = p[:1000] + prompt(600, seed=404)  # shares the boundaries up to 1000 tokens
    shared = 1000 // S
    hit = opts.r.generate(q)
    assert (hit.num_cached_tokens, hit.token_ids) == (shared // 2 * 2 * S,
                                                      opts.w.generate(q).token_ids)

    p0 = prompt(2000, seed=405)
    opts.b.generate(p0)
    assert state_boundaries(opts.restorable(p0, last * S, "B")) == {last}
    q0 = p0[:1000] + prompt(600, seed=406)
    miss = opts.b.generate(q0)
    assert (miss.num_cached_tokens, miss.token_ids) == (0, opts.w.generate(q0).token_ids)


def test_load_false_never_hits_but_saves(opts: Options):
    p = prompt(1500, seed=407)
    opts.w.generate(p)
    opts.restorable(p, deepest_boundary(len(p)), "A")  # W's save landed ...
    before = opts.w.connector_stats()
    again = opts.w.generate(p)
    assert again.num_cached_tokens == 0, "... and W, with load=false, does not use it"
    assert lookups(opts.w.connector_stats()) == lookups(before), "not even a lookup"


def test_save_false_stores_nothing(opts: Options):
    p = prompt(1500, seed=408)
    before = lookups(opts.r.connector_stats())
    out = opts.r.generate(p)
    assert out.num_cached_tokens == 0
    stats = opts.r.connector_stats()
    assert sum(lookups(stats).values()) == sum(before.values()) + 1, "R still looks up"
    # Saves are gathered inside the step that wrote them: nothing gathered, nothing queued.
    assert stats.get("tokens_saved", 0) == stats.get("blocks_saved", 0) == 0
    report = opts.report(p, "A")
    assert not any(any(row["present"]) for row in report["boundaries"]), report["why"]
    assert opts.r.generate(p).num_cached_tokens == 0
    assert out.token_ids == opts.w.generate(p).token_ids  # (W saves it: checked last)


def test_save_decode_false_keeps_only_prefill_blocks(opts: Options):
    """Turn 1's decode crosses the boundary after its prompt; B must not store what
    decode wrote, so turn 2 resumes at turn 1's last prompt boundary (vLLM's own
    checkpoint), token-identical to a cold run. With save_decode=true it resumes
    past turn 1's prompt (test_hybrid_restore's next-turn test)."""
    turn1 = prompt(700, seed=409)
    prompt_end = len(turn1) // BLOCK * BLOCK
    assert len(turn1) + 120 > prompt_end + BLOCK, "decode must cross a boundary"
    out1 = opts.b.generate(turn1, max_tokens=120)
    assert out1.token_ids == opts.w.generate(turn1, max_tokens=120).token_ids
    later = prompt(800, seed=410)
    opts.b.generate(later)
    opts.restorable(later, deepest_boundary(len(later)), "B")  # FIFO: turn 1's saves landed
    turn2 = turn1 + out1.token_ids + prompt(200, seed=411)
    report = opts.report(turn2, "B")
    assert report["hit_tokens"] == prompt_end, report["why"]
    assert decode_flagged(opts.tier.url, opts.namespace("B")) == 0
    hit = opts.b.generate(turn2)
    assert (hit.num_cached_tokens, hit.token_ids) == (prompt_end,
                                                      opts.w.generate(turn2).token_ids)


def decode_flagged(url: str, namespace: str) -> int:
    """How many blocks of ``namespace`` carry FLAG_DECODE."""
    with open_backend(url) as t:
        keys = [k.encode() for k, _ in t.scan_blocks() if k.namespace.hex() == namespace]
        return sum(bool(payload.read_header(v).flags & payload.FLAG_DECODE)
                   for v in t.get_many(keys) if v is not None)


def test_timeout_then_retry_after(opts: Options):
    """A tier that answers later than ``timeout_s`` is a miss; after that failure the
    connector leaves the tier alone for ``retry_after_s`` (even once it is fast again),
    then comes back and hits. R ends healthy. Short prompts
    and one token keep the requests inside the window on a busy box."""
    p = prompt(2 * BLOCK + 50, seed=412)
    ref = opts.w.generate(p, max_tokens=1)
    opts.restorable(p, 2 * BLOCK, "A")
    opts.proxy.set_delay(SLOW_S)
    t0 = time.monotonic()
    late = opts.r.generate(p, max_tokens=1)
    failed_by = time.monotonic()
    assert (late.num_cached_tokens, late.token_ids) == (0, ref.token_ids)

    opts.proxy.set_delay(0.0)
    # The tier is fast again and holds the prefix: only a connector that stays off
    # it can miss. (Proxy connection counts prove nothing: gRPC channels to one
    # target share their TCP connection.)
    off = opts.r.generate(p, max_tokens=1)
    assert time.monotonic() - t0 < RETRY_S, "the box was too slow to look inside the window"
    assert (off.num_cached_tokens, off.token_ids) == (0, ref.token_ids)

    time.sleep(max(0.0, failed_by + RETRY_S - time.monotonic()))
    back = opts.r.generate(p, max_tokens=1)
    assert (back.num_cached_tokens, back.token_ids) == (2 * BLOCK, ref.token_ids)


# -- one engine each -----------------------------------------------------------------------
def test_memory_url_in_a_single_engine(model_path: Path, opts: Options):
    p = prompt(1500, seed=413)
    ref = opts.w.generate(p)
    deepest = deepest_boundary(len(p))
    with engine(engine_kwargs(model_path, "memory://"), "opt-memory") as m:
        first = m.generate(p)
        assert (first.num_cached_tokens, first.token_ids) == (0, ref.token_ids)
        # Nobody else can reach this tier: wait on the engine's own upload counter for
        # each boundary's attention block and the states at the prompt's end (default
        # admission).
        blocks = deepest // BLOCK + STATE_GROUPS
        wait_until(lambda: m.connector_stats().get("blocks_saved", 0) >= blocks, 60,
                   f"{blocks} blocks saved to memory://")
        hit = m.generate(p)  # local prefix cache emptied first: the hit is the tier's
        assert (hit.num_cached_tokens, hit.token_ids) == (deepest, ref.token_ids)
        assert m.connector_stats()["lookup_hit"] == 1


@pytest.mark.redis
def test_rediss_with_acl_user_through_the_connector(model_path: Path, opts: Options,
                                                    tmp_path: Path):
    """Mutual TLS and a least-privilege ACL user (the default user is off), all in
    the connector's tier_url."""
    from kvtier.testing.redis_servers import (
        ADMIN_USER,
        KVTIER_USER,
        make_tls_files,
        redis_standalone,
    )

    p = prompt(1500, seed=414)
    ref = opts.w.generate(p)
    tls = make_tls_files(tmp_path / "certs")
    with redis_standalone(tmp_path, tls=tls, acl_users=[KVTIER_USER], admin=ADMIN_USER) as srv:
        url = srv.url()
        assert url.startswith(f"rediss://{KVTIER_USER.username}:")
        with engine(engine_kwargs(model_path, url), "opt-rediss") as s:
            first = s.generate(p)
            assert (first.num_cached_tokens, first.token_ids) == (0, ref.token_ids)
            deepest = deepest_boundary(len(p))
            wait_restorable(url, p, deepest, timeout_s=60)
            hit = s.generate(p)
            assert (hit.num_cached_tokens, hit.token_ids) == (deepest, ref.token_ids)
            stats = s.connector_stats()
        with srv.client() as admin:
            assert admin.dbsize() > 0
    assert not any(k.startswith("error_") for k in stats), stats


def test_bad_admission_stops_the_engine_with_a_clear_error(model_path: Path):
    """An unknown policy, or checkpoint_every next to another policy, fails at start
    with a message naming the option, never a silently different policy."""
    for extra, words in (({"admission": "lru"}, ["unknown admission policy 'lru'", "marconi"]),
                         ({"admission": "marconi", "checkpoint_every": 2},
                          ["checkpoint_every", "admission=dense"])):
        with engine(engine_kwargs(model_path, "grpc://127.0.0.1:9", **extra), "opt-bad") as e, \
                pytest.raises(RuntimeError) as err:
            e.wait_ready()
        for w in words:
            assert w in str(err.value), str(err.value)[-2000:]
