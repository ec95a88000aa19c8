"""Triton copy kernels vs the torch reference.

There is no GPU here, so the kernels run under Triton's CPU interpreter
(``TRITON_INTERPRET=1``), in a subprocess because the flag must be set
before Triton compiles anything. The same check runs on CUDA when present.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_triton_kernels_match_torch_reference_byte_for_byte():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "kvtier.kernels.selfcheck"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical" in r.stdout
