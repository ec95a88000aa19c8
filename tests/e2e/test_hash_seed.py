"""Engines with different ``PYTHONHASHSEED`` share no block, and ``kvtier explain`` says why.

vLLM 0.32 seeds every prefix hash with ``PYTHONHASHSEED`` (sha256 included), so
two real engines seeded 1 and 2 compute different hashes for the same prompt:
the second never hits what the first stored, and, since the seed is part of the
namespace, explain (the installed console script, run with yet another seed)
names the mismatch and the value that holds the prompt instead of "nothing stored".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.backends import open_backend
from kvtier.manifest import NamespaceManifest, load_manifests
from kvtier.testing.engine_proc import EngineProcess, engine_kwargs
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.tiny_model import make_prompt_token_ids
from kvtier.testing.waits import wait_restorable

pytestmark = pytest.mark.engine
SAVE_TIMEOUT_S = 60.0  # uploads take milliseconds, but the box is shared and busy


@pytest.fixture(scope="module")
def seeded(model_path: Path) -> Iterator[tuple[TierProcess, EngineProcess, EngineProcess]]:
    """A tier of its own and two engines on it, PYTHONHASHSEED 1 and 2."""
    with TierProcess(capacity="1GiB") as tier:
        one = EngineProcess(engine_kwargs(model_path, tier.url), "seed-1",
                            env={"PYTHONHASHSEED": "1"})
        two = EngineProcess(engine_kwargs(model_path, tier.url), "seed-2",
                            env={"PYTHONHASHSEED": "2"})
        try:
            yield tier, one.wait_ready(), two.wait_ready()
        finally:
            one.close()
            two.close()


def manifest_of(url: str, seed: str) -> NamespaceManifest:
    """The manifest recording ``seed`` (each engine's connector writes its own)."""
    deadline = time.monotonic() + SAVE_TIMEOUT_S
    with open_backend(url) as b:
        while True:
            found = [m for m in load_manifests(b).values() if m.hash_seed == seed]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no manifest for PYTHONHASHSEED={seed}"
            time.sleep(0.1)


def test_different_seeds_never_share_and_explain_names_it(seeded):
    tier, one, two = seeded
    p = make_prompt_token_ids(2000, 301, 4096)
    ref = one.generate(p)  # the first run of this prompt anywhere: a cold reference
    assert ref.num_cached_tokens == 0
    m1 = manifest_of(tier.url, "1")
    ns1, deepest = m1.namespace, (len(p) - 1) // m1.boundary_tokens * m1.boundary_tokens
    wait_restorable(tier.url, p, deepest, timeout_s=SAVE_TIMEOUT_S, namespace=ns1)

    # Node 2 has served something else (so its manifest is in the tier), not this prompt.
    two.generate(make_prompt_token_ids(500, 302, 4096))
    ns2 = manifest_of(tier.url, "2").namespace
    assert ns2 != ns1

    # What an operator asks before node 2 serves it: why would it miss?
    exe = Path(sys.executable).with_name("kvtier")
    env = {**os.environ, "PYTHONHASHSEED": "5", "COLUMNS": "200"}  # explain's own: neither
    r = subprocess.run([str(exe), "explain", "--url", tier.url, "-n", ns2, "--token-ids",
                        ",".join(map(str, p)), "--json"], capture_output=True, text=True,
                       timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["hit_tokens"] == 0
    assert rep["why"].startswith(f"hash seed mismatch: namespace {ns1}"), rep["why"]
    assert "set PYTHONHASHSEED=1 the same on every node" in rep["why"]

    hits_before = two.connector_stats().get("lookup_hit", 0)
    out = two.generate(p)
    assert out.num_cached_tokens == 0, "an engine seeded otherwise computes other hashes"
    assert out.token_ids == ref.token_ids
    assert two.connector_stats().get("lookup_hit", 0) == hits_before == 0
