#!/usr/bin/env bash
# Main job: set up, then run the tier server with its embedded in-memory store.
# Extra arguments go to `kvtier serve` (e.g. --port 7070 --capacity 8GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec kvtier serve "$@"
