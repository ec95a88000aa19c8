"""PD hand-off across test hosts: tier, prefill node and decode node each in their
own network namespace, talking over a bridge (real addresses, real TCP)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvtier.testing import netns
from kvtier.testing.engine_proc import EngineProcess, Generation, engine_kwargs
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import scrape_metrics, wait_until
from tests.e2e.conftest import SAVE_TIMEOUT_S, deepest_boundary, landed, save_until_restorable

pytestmark = [pytest.mark.engine, pytest.mark.netns]
if (why := netns.available()) is not None:
    pytest.skip(why, allow_module_level=True)

DECODE_METRICS = 9100  # on the decode host's own address: nothing else binds there


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, 4096)


class PD:
    def __init__(self, c: netns.Cluster, tier: TierProcess, prefill: EngineProcess,
                 decode: EngineProcess):
        self.c, self.tier, self.prefill, self.decode = c, tier, prefill, decode


@pytest.fixture(scope="module")
def pd(model_path) -> Iterator[PD]:
    with netns.cluster(["tier", "prefill", "decode"]) as c:
        # Small TCP send buffers on the tier host: a tier process that dies mid-read
        # loses what it had not sent yet, instead of its kernel finishing the send.
        c.sysctl("tier", "net.ipv4.tcp_wmem", "4096 16384 65536")
        tier = TierProcess(port=7070, host=c.nodes["tier"], launcher=tuple(c.launcher("tier")),
                           extra_args=("--bulk-port", "7071")).start()
        extra = {"decode": {"metrics_port": DECODE_METRICS}}
        nodes = {
            role: EngineProcess(engine_kwargs(model_path, tier.url, **extra.get(role, {})),
                                f"pd-{role}", launcher=tuple(c.launcher(role)))
            for role in ("prefill", "decode")
        }
        try:
            for n in nodes.values():
                n.wait_ready()
            yield PD(c, tier, nodes["prefill"], nodes["decode"])
        finally:
            for n in nodes.values():
                n.close()
            tier.stop()


def test_nodes_are_separate_hosts(pd: PD):
    assert pd.tier.url == f"grpc://{pd.c.nodes['tier']}:7070"
    connect = "import socket, sys; socket.create_connection((sys.argv[1], 7070), timeout=5)"
    # The tier's port is not open on the decode host's own loopback: refused there ...
    r = pd.c.run("decode", "python3", "-c", connect, "127.0.0.1")
    assert r.returncode == 1 and "ConnectionRefusedError" in r.stderr, r.stderr
    # ... and reachable only over the network, at the tier host's address.
    r = pd.c.run("decode", "python3", "-c", connect, pd.c.nodes["tier"])
    assert r.returncode == 0, r.stderr


def test_prefill_to_decode_handoff(pd: PD, cold):
    p = prompt(2000, seed=401)
    ref = cold.generate(p)
    pd.prefill.generate(p, max_tokens=1)  # the prefill node's job: prompt in, KV out
    landed(pd.tier.url, p, deepest_boundary(len(p)))
    out = pd.decode.generate(p)
    assert out.num_cached_tokens == deepest_boundary(len(p)) > 0
    assert out.token_ids == ref.token_ids
    assert pd.decode.connector_stats()["bytes_loaded"] > 0


def test_decode_node_cut_off_from_tier_serves_cold(pd: PD, cold):
    p, q = prompt(1500, seed=402), prompt(1500, seed=403)
    pd.prefill.generate(p, max_tokens=1)
    landed(pd.tier.url, p, deepest_boundary(len(p)))
    pd.c.link("tier", up=False)  # the tier host drops off the network
    try:
        out = pd.decode.generate(p)
        assert out.num_cached_tokens == 0
        assert out.token_ids == cold.generate(p).token_ids
    finally:
        pd.c.link("tier", up=True)
    # Back on the network: both nodes use the tier again (after their back-off).
    ref_q = cold.generate(q)
    full = deepest_boundary(len(q))
    save_until_restorable(pd.prefill, pd.tier.url, q, full, "prefill saves after the cut")

    def decode_hits() -> bool:
        back = pd.decode.generate(q)
        assert back.token_ids == ref_q.token_ids
        return back.num_cached_tokens == full

    wait_until(decode_hits, SAVE_TIMEOUT_S, "the decode node hits the tier after the cut")


def _loads_in_flight(pd: PD) -> float:
    m = scrape_metrics(DECODE_METRICS, host=pd.c.nodes["decode"])
    return m.get(("kvtier_connector_loads_in_flight", ()), 0.0)


def _generate_watching_load(pd: PD, tokens: list[int], then=None) -> Generation:  # noqa: ANN001
    """Serve ``tokens`` on the decode node; once its load is seen in flight (the
    connector's gauge, scraped from outside), call ``then()``."""
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(pd.decode.generate, tokens)
        wait_until(lambda: fut.done() or _loads_in_flight(pd) > 0, 120,
                   "the decode node starts its load", poll_s=0.02)
        assert not fut.done(), "the load finished before it was seen in flight"
        if then is not None:
            then()
        return fut.result(timeout=600)


def test_tier_killed_while_a_load_is_in_flight(pd: PD, cold):
    """The tier process dies while the decode node is fetching from it: the request
    still finishes with cold tokens, and the connector counts a failed load, not a
    restore. The tier's uplink is capped so a ~1.8K-token load (~1.3 MB) takes
    seconds; the same load with no kill restores (so the kill, not the cap, fails it).
    Last in this module: the tier comes back empty."""
    p, q = prompt(2000, seed=404), prompt(2000, seed=405)
    ref_p, ref_q = cold.generate(p), cold.generate(q)
    for x in (p, q):
        pd.prefill.generate(x, max_tokens=1)
        landed(pd.tier.url, x, deepest_boundary(len(x)))
    try:
        with pd.c.slow_uplink("tier", rate="4mbit"):
            s0 = pd.decode.connector_stats()
            control = _generate_watching_load(pd, q)
            s1 = pd.decode.connector_stats()
            killed = _generate_watching_load(pd, p, then=pd.tier.kill)
            s2 = pd.decode.connector_stats()
    finally:
        if pd.tier.proc is None:
            pd.tier.start()

    def delta(a: dict, b: dict, k: str) -> int:
        return b.get(k, 0) - a.get(k, 0)

    assert (control.num_cached_tokens, control.token_ids) == (deepest_boundary(len(q)),
                                                              ref_q.token_ids)
    assert (delta(s0, s1, "requests_loaded"), delta(s0, s1, "requests_load_failed")) == (1, 0)
    assert killed.token_ids == ref_p.token_ids
    assert (delta(s1, s2, "requests_loaded"), delta(s1, s2, "requests_load_failed")) == (0, 1)
    assert delta(s1, s2, "error_tier_unavailable") == 1, "an outage, not a miss"
