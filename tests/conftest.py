"""Shared pytest set-up. Several suites register plugins here: append, don't replace."""

import sys
from pathlib import Path

# Make `tests.*` helper modules importable however pytest is invoked.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.redis_fixtures", "tests.helpers.servers"]
