"""Redis Cluster failover while engines run: a primary dies, its replica is promoted.

Three primaries with a replica each (real ``redis-server`` processes), two engines
on the cluster URL, one cold engine (no connector) for reference tokens. While
node B serves prompts, the primary of slot 0 is SIGKILLed and the cluster
promotes its replica (cluster-node-timeout 3 s). Every token served, before,
during and after, equals the cold engine's; what was replicated before the
failover is restored from the promoted replica; saves land on the new topology.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.redis_servers import redis_cluster
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import wait_until
from tests.e2e.conftest import deepest_boundary, landed, save_until_restorable

pytestmark = [pytest.mark.engine, pytest.mark.redis]


def prompt(n: int, seed: int) -> list[int]:
    return make_prompt_token_ids(n, seed, 4096)


def test_replica_promoted_while_engines_run(model_path: Path, tmp_path: Path) -> None:
    with redis_cluster(tmp_path, replicas=1) as cluster:
        url = cluster.url()
        engines = {"cold": EngineProcess(engine_kwargs(model_path), "failover-cold"),
                   "a": EngineProcess(engine_kwargs(model_path, url), "failover-a"),
                   "b": EngineProcess(engine_kwargs(model_path, url), "failover-b")}
        try:
            for e in engines.values():
                e.wait_ready()
            cold, a, b = engines["cold"], engines["a"], engines["b"]
            prompts = [prompt(1100 + 100 * i, seed=400 + i) for i in range(5)]
            refs = [cold.generate(p).token_ids for p in prompts]
            full = [deepest_boundary(len(p)) for p in prompts]

            assert a.generate(prompts[0]).token_ids == refs[0]
            landed(url, prompts[0], full[0])
            cluster.wait_replicated()

            served: list[tuple[int, list[int]]] = []

            def keep_serving() -> None:  # node B runs while the primary dies
                for _ in range(2):
                    for i in (1, 2, 3):
                        served.append((i, b.generate(prompts[i]).token_ids))

            t = threading.Thread(target=keep_serving)
            t.start()
            cluster.kill_a_primary_and_wait_for_failover()
            t.join()
            assert served and all(tok == refs[i] for i, tok in served), "wrong tokens served"

            def restores_replicated() -> bool:
                out = b.generate(prompts[0])
                assert out.token_ids == refs[0]
                return out.num_cached_tokens == full[0]

            wait_until(restores_replicated, 120, "B restores prompt 0 from the promoted replica",
                       poll_s=1)
            save_until_restorable(a, url, prompts[4], full[4], "A saves after the failover")
            hit = b.generate(prompts[4])
            assert (hit.num_cached_tokens, hit.token_ids) == (full[4], refs[4])
        finally:
            for e in engines.values():
                e.close()
