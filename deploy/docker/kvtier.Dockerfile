# kvtier:0.1.0 -- the tier server (`kvtier serve`), the PD router (`kvtier router`) and the
# admin CLI. No vLLM, no GPU. Build from the repository root: deploy/docker/build.sh.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvtier ./kvtier
COPY connectors ./connectors
RUN pip install . && kvtier --help >/dev/null

# No ENTRYPOINT: the manifests give the whole command in `args` (kvtier serve ..., kvtier router ...).
USER nobody
WORKDIR /
EXPOSE 7070 7071 9400
CMD ["kvtier", "serve", "--host", "0.0.0.0"]
