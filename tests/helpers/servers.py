"""Real ``kvtier serve`` processes for tests: free port, wait until healthy, always killed.

The process handling itself is :class:`kvtier.testing.tier_proc.TierProcess`
(the benchmark starts servers the same way); this module adds what tests need
on top: a context manager that kills the server whatever the test did, the
command line of the ``kvtier`` console script, and pytest fixtures (registered from
``tests/conftest.py``): ``tier_server`` is one server per test module, for tests
that do not break it; a test that kills or stops its server takes its own with
``with running_tier() as tier:``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator, Sequence

import pytest

from kvtier.testing.tier_proc import TierProcess, free_port

__all__ = ["TierProcess", "free_port", "kvtier_cmd", "running_tier", "server_log"]


def kvtier_cmd() -> list[str]:
    """The installed ``kvtier`` console script, else the same CLI through this interpreter."""
    exe = shutil.which("kvtier")
    return [exe] if exe else [sys.executable, "-m", "kvtier.cli"]


def server_log(tier: TierProcess) -> str:
    """Tail of the server's log, to put in assertion messages."""
    try:
        with open(tier.log_path) as f:
            return f.read()[-4000:]
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def running_tier(capacity: str = "256MiB", extra_args: Sequence[str] = (),
                 timeout_s: float = 30.0) -> Iterator[TierProcess]:
    """A healthy ``kvtier serve`` on a free port; SIGTERM then SIGKILL when the block ends."""
    tier = TierProcess(capacity=capacity, extra_args=tuple(extra_args))
    try:
        yield tier.start(timeout_s)
    finally:
        try:
            tier.stop()
        finally:
            tier.kill()


@pytest.fixture(scope="module")
def tier_server() -> Iterator[TierProcess]:
    with running_tier() as tier:
        yield tier
