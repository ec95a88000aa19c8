"""Which copy path each KV-cache group gets, and that no Triton failure reaches vLLM's step.

There is no GPU here. The selection is asked for a CUDA device while the
tensors stay on the CPU: that fake device is the only thing faked. Triton then
runs for real under its CPU interpreter (``TRITON_INTERPRET=1``, in a
subprocess because the flag must be set before Triton compiles anything), and
without the interpreter it really fails at launch (no GPU driver), which is
the call-time failure the fallback must absorb.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

LAYOUTS = {
    "hybrid (block dim 0 and 1, strided page, byte words)": "triton",
    "non-contiguous per-block bytes": "torch",
    "block dim 2": "torch",
    "capable views plus one non-contiguous view": "torch",
}


def _run(code: str, interpret: bool) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    prelude = "import json, logging\nlogging.basicConfig(level=logging.INFO)\n"
    r = subprocess.run([sys.executable, "-c", prelude + code], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _all_equal(c: dict) -> None:
    assert len(c["gather_cells_equal"]) == c["views"] * c["rows"]
    assert all(c["gather_cells_equal"]), c["gather_cells_equal"]  # every view of every row
    assert all(c["scatter_views_equal"]), c["scatter_views_equal"]


def test_each_layout_gets_the_path_that_can_copy_it_and_copies_like_the_reference():
    report, err = _run("from kvtier.kernels.selfcheck import selection_report\n"
                       "print(json.dumps(selection_report('cuda')))", interpret=True)
    assert set(report) == set(LAYOUTS)
    for name, want in LAYOUTS.items():
        c = report[name]
        assert c["chosen"] == want and c["after"] == want, (name, c)
        _all_equal(c)
    assert "copies with torch (view 0" in err and "copies with Triton" in err


def test_triton_failure_at_call_time_falls_back_to_torch():
    # No interpreter, no GPU: Triton raises at launch ("0 active drivers").
    c, err = _run("from kvtier.kernels.selfcheck import LAYOUTS, compare\n"
                  "make, _ = LAYOUTS['hybrid (block dim 0 and 1, strided page, byte words)']\n"
                  "print(json.dumps(compare(lambda s: make(16, s), 'cuda')))", interpret=False)
    assert (c["chosen"], c["after"]) == ("triton", "torch"), c
    _all_equal(c)
    assert "Triton copy failed" in err
