#!/usr/bin/env bash
# Regenerate kvtier/proto/tier_pb2*.py from proto/kvtier/v1/tier.proto.
# The generated files are committed, so installs never need grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-kvtier/proto}
tmp=$(mktemp -d)
python3 -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  proto/kvtier/v1/tier.proto
mkdir -p "$OUT"
cp "$tmp/kvtier/v1/tier_pb2.py" "$tmp/kvtier/v1/tier_pb2.pyi" "$OUT/"
sed 's/^from kvtier\.v1 import tier_pb2 as/from kvtier.proto import tier_pb2 as/' \
  "$tmp/kvtier/v1/tier_pb2_grpc.py" > "$OUT/tier_pb2_grpc.py"
rm -rf "$tmp"
