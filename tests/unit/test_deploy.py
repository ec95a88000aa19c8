"""The PD-cluster manifests and the Dockerfiles behind their images hang together, offline.

Docker cannot build here, so the Dockerfiles are checked as far as files allow:
every image the manifests name is built by ``deploy/docker/build.sh`` from a
Dockerfile that parses, copies only files that exist, and installs the commands
the manifests run.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from dockerfile_parse import DockerfileParser

yaml = pytest.importorskip("yaml")

from kvtier.config import ConnectorConfig, ServerConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
UPSTREAM_IMAGES = {"redis"}  # public images used as they are
ROLES = ("prefill", "decode")


def docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = []
    for name in kust["resources"]:
        out.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return out


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs() if d["kind"] == kind}


def containers(d: dict) -> list[dict]:
    return d["spec"]["template"]["spec"]["containers"]


def all_containers() -> list[dict]:
    return [c for d in docs() if d["kind"] in ("Deployment", "StatefulSet")
            for c in containers(d)]


def vllm(role: str) -> dict:
    (c,) = containers(by_kind("Deployment")[f"vllm-{role}"])
    return c


def flag(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def built_images() -> dict[str, Path]:
    """Image tag -> Dockerfile, from the ``docker build`` lines of build.sh."""
    out = {}
    for line in (DOCKER / "build.sh").read_text().splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] == ["docker", "build"]:
            out[flag(argv, "-t")] = ROOT / flag(argv, "-f")
            assert argv[-1] == ".", "the build context is the repository root"
    return out


def dockerfile(image: str) -> DockerfileParser:
    return DockerfileParser(path=str(built_images()[image]))


# -- manifests -----------------------------------------------------------------------------
def test_every_resource_file_is_listed_and_parses():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert {d["kind"] for d in docs()} >= {"Deployment", "Service", "StatefulSet"}


def test_tier_server_args_are_a_valid_server_config():
    (tier,) = containers(by_kind("Deployment")["kvtier-tier"])
    args = tier["args"]
    assert args[:2] == ["kvtier", "serve"]
    cfg = load_config(ServerConfig, {"host": flag(args, "--host"),
                                     "port": int(flag(args, "--port")),
                                     "capacity": flag(args, "--capacity"),
                                     "bulk_port": int(flag(args, "--bulk-port")),
                                     "metrics_port": int(flag(args, "--metrics-port"))})
    ports = {p["containerPort"] for p in tier["ports"]}
    assert {cfg.port, cfg.bulk_port, cfg.metrics_port} <= ports
    svc_ports = {p["port"] for p in by_kind("Service")["kvtier-tier"]["spec"]["ports"]}
    assert {cfg.port, cfg.bulk_port} <= svc_ports


def connector_config(c: dict) -> tuple[dict, ConnectorConfig]:
    ktc = json.loads(flag(c["args"], "--kv-transfer-config"))
    return ktc, load_config(ConnectorConfig, ktc["kv_connector_extra_config"])


@pytest.mark.parametrize("role", ROLES)
def test_vllm_nodes_load_the_connector_against_the_tier_service(role):
    c = vllm(role)
    assert c["command"] == ["vllm", "serve"]
    args = c["args"]
    assert "--enable-prefix-caching" in args and flag(args, "--mamba-cache-mode") == "align"
    ktc, cfg = connector_config(c)
    assert ktc["kv_connector"] == "KVTierConnector"
    assert ktc["kv_connector_module_path"] == "kvtier.connectors.vllm"
    host, port = cfg.tier_url.removeprefix("grpc://").split(":")
    svc = by_kind("Service")[host]
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}


@pytest.mark.parametrize("role", ROLES)
def test_tensor_parallel_size_uses_every_gpu_asked_for(role):
    c = vllm(role)
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert int(flag(c["args"], "--tensor-parallel-size", "1")) == gpus


@pytest.mark.parametrize("role", ROLES)
def test_every_connector_metrics_port_is_exposed(role):
    """The scheduler serves on metrics_port, TP worker ``rank`` on metrics_port + 1 + rank."""
    c = vllm(role)
    _, cfg = connector_config(c)
    tp = int(flag(c["args"], "--tensor-parallel-size", "1"))
    wanted = {cfg.metrics_port} | {cfg.metrics_port + 1 + rank for rank in range(tp)}
    assert wanted <= {p["containerPort"] for p in c["ports"]}


def namespace_identity(c: dict) -> dict[str, object]:
    """Everything that must agree for nodes to share blocks (the namespace and the hashes)."""
    args = c["args"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    _, cfg = connector_config(c)
    return {
        "model": args[0], "model_id": cfg.model_id, "tenant": cfg.tenant,
        "dtype": flag(args, "--dtype", "auto"),
        "tp": flag(args, "--tensor-parallel-size", "1"),
        "block_size": flag(args, "--block-size"),
        "hash_algo": flag(args, "--prefix-caching-hash-algo", "sha256"),
        "hash_seed": env.get("PYTHONHASHSEED"),
        "mamba_cache_mode": flag(args, "--mamba-cache-mode"),
        "image": c["image"],
    }


def test_all_nodes_share_one_namespace_identity():
    prefill, decode = (namespace_identity(vllm(r)) for r in ROLES)
    assert prefill == decode
    # Set explicitly, not left to defaults that may differ between images or hosts.
    assert prefill["hash_seed"] is not None and prefill["dtype"] != "auto"
    assert prefill["model_id"] == prefill["model"]


# -- images ----------------------------------------------------------------------------------
def test_every_image_is_built_by_a_dockerfile():
    built = built_images()
    for c in all_containers():
        name = c["image"].rsplit(":", 1)[0]
        if name in UPSTREAM_IMAGES:
            continue
        assert c["image"] in built, f"{c['image']} has no `docker build` in build.sh"
        assert built[c["image"]].is_file()


@pytest.mark.parametrize("image", sorted(built_images()))
def test_dockerfile_copies_files_that_exist(image):
    df = dockerfile(image)
    assert df.baseimage, "FROM"
    copies = [i for i in df.structure if i["instruction"] in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        argv = [a for a in shlex.split(ins["value"]) if not a.startswith("--")]
        for src in argv[:-1]:
            assert (ROOT / src).exists(), f"{image}: {ins['content'].strip()}"
    # What the package needs to install is all copied.
    copied = {Path(a).name for ins in copies for a in shlex.split(ins["value"])[:-1]}
    assert {"pyproject.toml", "README.md", "kvtier", "connectors"} <= copied


def test_image_versions_match_the_sources():
    project = pyproject()["project"]
    assert "kvtier:" + project["version"] in built_images()
    (pin,) = [d for d in project["optional-dependencies"]["vllm"] if d.startswith("vllm")]
    vllm_version = pin.split("==")[1]
    assert f"vllm-kvtier:{vllm_version}" in built_images()
    assert dockerfile(f"vllm-kvtier:{vllm_version}").baseimage == \
        f"vllm/vllm-openai:v{vllm_version}"


def test_commands_the_manifests_run_exist_in_their_images():
    scripts = pyproject()["project"]["scripts"]
    for c in all_containers():
        if c["image"].rsplit(":", 1)[0] in UPSTREAM_IMAGES:
            continue
        argv = [*c.get("command", []), *c.get("args", [])]
        if "command" not in c:
            # args alone replace the image's CMD but keep its ENTRYPOINT: there must be none.
            assert not re.search(r"^\s*ENTRYPOINT", dockerfile(c["image"]).content, re.M)
        if c["image"].startswith("kvtier:"):
            assert argv[0] in scripts, f"{argv[0]} is not a console script of kvtier"
        else:
            assert argv[0] == "vllm"  # GPU vLLM's console script (see deploy/README.md)


def test_slim_image_runs_without_torch_or_vllm():
    """kvtier:X has no vLLM or torch: the tier server, router and CLI must not import them."""
    code = ("import importlib, importlib.util, sys\n"
            "for m in ('kvtier.cli', 'kvtier.server.grpc_server', 'kvtier.backends.grpc',"
            " 'kvtier.backends.redis', 'kvtier.router'):\n"
            "    if importlib.util.find_spec(m): importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'vllm', 'triton') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
