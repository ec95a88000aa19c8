#!/usr/bin/env bash
# Set up, then run the whole test suite (lint included). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
echo "[test] building the tiny hybrid model (cached)"
"$PY" -m kvtier.testing.tiny_model --size tiny
echo "[test] ruff"
"$PY" -m ruff check kvtier connectors tests
echo "[test] pytest"
export PYTHONHASHSEED=0
exec "$PY" -m pytest -q -ra "$@" tests
