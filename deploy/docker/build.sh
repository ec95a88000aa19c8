#!/usr/bin/env bash
# Build the images that deploy/k8s names, from the repository root (the build context).
# tests/unit/test_deploy.py reads the `docker build` lines below: keep one per image.
set -euo pipefail
cd "$(dirname "$0")/../.."
docker build -f deploy/docker/kvtier.Dockerfile -t kvtier:0.1.0 .
docker build -f deploy/docker/vllm-kvtier.Dockerfile -t vllm-kvtier:0.32.0 .
