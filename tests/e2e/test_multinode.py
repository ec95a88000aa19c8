"""PD hand-off across test hosts: tier, prefill node and decode node each in their
own network namespace, talking over a bridge (real addresses, real TCP)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvtier.testing import netns
from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import make_prompt_token_ids

pytestmark = [pytest.mark.engine, pytest.mark.netns]
if (why := netns.available()) is not None:
    pytest.skip(why, allow_module_level=True)


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, 4096)


class PD:
    def __init__(self, c: netns.Cluster, tier: TierProcess, prefill: EngineProcess,
                 decode: EngineProcess):
        self.c, self.tier, self.prefill, self.decode = c, tier, prefill, decode


@pytest.fixture(scope="module")
def pd(model_path) -> Iterator[PD]:
    with netns.cluster(["tier", "prefill", "decode"]) as c:
        tier = TierProcess(port=7070, host=c.nodes["tier"], launcher=tuple(c.launcher("tier")),
                           extra_args=("--bulk-port", "7071")).start()
        nodes = {
            role: EngineProcess(engine_kwargs(model_path, tier.url), f"pd-{role}",
                                launcher=tuple(c.launcher(role)))
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
    # The tier's port is not open on the decode host's own loopback: only over the network.
    r = pd.c.run("decode", "python3", "-c",
                 "import socket; socket.create_connection(('127.0.0.1', 7070), timeout=1)")
    assert r.returncode != 0


def test_prefill_to_decode_handoff(pd: PD, cold):
    p = prompt(2000, seed=401)
    ref = cold.generate(p)
    pd.prefill.generate(p, max_tokens=1)  # the prefill node's job: prompt in, KV out
    out = pd.decode.generate(p)
    assert out.num_cached_tokens == 1920
    assert out.token_ids == ref.token_ids
    assert pd.decode.connector_stats()["bytes_loaded"] > 0


def test_decode_node_cut_off_from_tier_serves_cold(pd: PD, cold):
    p, q = prompt(1500, seed=402), prompt(1500, seed=403)
    pd.prefill.generate(p, max_tokens=1)
    pd.c.link("tier", up=False)  # the tier host drops off the network
    try:
        out = pd.decode.generate(p)
        assert out.num_cached_tokens == 0
        assert out.token_ids == cold.generate(p).token_ids
    finally:
        pd.c.link("tier", up=True)
    time.sleep(1.5)  # past the connector's back-off (retry_after_s=1 in tests)
    pd.prefill.generate(q, max_tokens=1)
    back = pd.decode.generate(q)
    assert back.num_cached_tokens == 1152
    assert back.token_ids == cold.generate(q).token_ids
