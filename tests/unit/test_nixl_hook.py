"""The PYTHONPATH hook ``kvtier bench pd`` gives NixlConnector engines: NIXL agents get no
progress thread (vLLM offers no setting for it; on, it spins a core per agent)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvtier.benches.pd import NIXL_HOOK

pytest.importorskip("nixl._api")

PROBE = ("import nixl._api as a, os; c = a.nixl_agent_config(num_threads=4); "
         "print(c.enable_pthread, c.num_threads, os.environ.get('UCX_RCACHE_MAX_UNRELEASED'))")


def _probe(hook: bool) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "UCX_RCACHE_MAX_UNRELEASED")}
    if hook:
        env["PYTHONPATH"] = str(NIXL_HOOK)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[-2]


def test_hook_turns_the_progress_thread_off_and_keeps_other_settings() -> None:
    assert _probe(hook=False) == "True 4 None"
    # vLLM's own UCX setting is kept (it cannot set it once NIXL is imported).
    assert _probe(hook=True) == "False 4 1024"
