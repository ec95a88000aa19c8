"""The PD-cluster manifests render and hang together, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from kvtier.config import ConnectorConfig, ServerConfig, load_config  # noqa: E402

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


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


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


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


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_vllm_nodes_load_the_connector_against_the_tier_service(role):
    (c,) = containers(by_kind("Deployment")[f"vllm-{role}"])
    args = c["args"]
    assert "--enable-prefix-caching" in args and flag(args, "--mamba-cache-mode") == "align"
    ktc = json.loads(flag(args, "--kv-transfer-config"))
    assert ktc["kv_connector"] == "KVTierConnector"
    assert ktc["kv_connector_module_path"] == "kvtier.connectors.vllm"
    cfg = load_config(ConnectorConfig, ktc["kv_connector_extra_config"])
    host, port = cfg.tier_url.removeprefix("grpc://").split(":")
    svc = by_kind("Service")[host]
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert env.get("PYTHONHASHSEED") == "0", "block hashes must agree across nodes"


def test_all_nodes_share_one_namespace_identity():
    ids = set()
    for role in ("prefill", "decode"):
        (c,) = containers(by_kind("Deployment")[f"vllm-{role}"])
        ktc = json.loads(flag(c["args"], "--kv-transfer-config"))
        ids.add((ktc["kv_connector_extra_config"].get("model_id"), c["args"][2]))
    assert len(ids) == 1
