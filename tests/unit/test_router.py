"""The PD router's protocol shaping, backend selection and errors, without vLLM.

Real router code throughout: the app runs with its lifespan (health checks) against
ports where nothing listens, which is what a router sees when every backend is down.
The end-to-end behaviour against real vLLM API servers is tests/e2e/test_router.py.
"""

from __future__ import annotations

import copy

import httpx
import pytest
from fastapi.testclient import TestClient

from kvtier.router import RouterConfig, create_app
from kvtier.router.pool import NoBackend, Pool
from kvtier.router.protocol import PREFILL_KV_PARAMS, affinity_text, decode_body, prefill_body
from kvtier.testing.tier_proc import free_port

NIXL_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
               "remote_engine_id": "e", "remote_host": "h", "remote_port": 1,
               "remote_num_tokens": 1999}


def test_prefill_request_is_vllms_pd_protocol():
    body = {"model": "m", "prompt": "p", "max_tokens": 50, "stream": True, "min_tokens": 5,
            "stream_options": {"include_usage": True}, "temperature": 0}
    original = copy.deepcopy(body)
    p = prefill_body(body, chat=False)
    assert p == {"model": "m", "prompt": "p", "max_tokens": 1, "stream": False, "temperature": 0,
                 "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                        "remote_engine_id": None, "remote_block_ids": None,
                                        "remote_host": None, "remote_port": None}}
    assert body == original  # decode gets the client's request untouched
    chat = prefill_body({"messages": [], "max_completion_tokens": 9}, chat=True)
    assert chat["max_tokens"] == 1 and chat["max_completion_tokens"] == 1
    assert prefill_body({"messages": []}, chat=True)["max_completion_tokens"] == 1
    p["kv_transfer_params"]["remote_host"] = "x"
    assert PREFILL_KV_PARAMS["remote_host"] is None  # each request gets its own copy


def test_decode_request_carries_prefill_params_unchanged_or_none():
    body = {"model": "m", "prompt": "p", "max_tokens": 50, "stream": True}
    d = decode_body(body, {"kv_transfer_params": NIXL_PARAMS})
    assert d == {**body, "kv_transfer_params": NIXL_PARAMS}
    assert decode_body(body, {"kv_transfer_params": None}) == body
    assert decode_body({**body, "kv_transfer_params": {"x": 1}}, {}) == body


def test_affinity_follows_the_prompt_prefix():
    system = {"role": "system", "content": "s" * 600}
    a = affinity_text({"messages": [system, {"role": "user", "content": "a" * 900}]}, 1024)
    b = affinity_text({"messages": [system, {"role": "user", "content": "a" * 900 + "b"}]}, 1024)
    c = affinity_text({"messages": [{"role": "system", "content": "t" * 600}]}, 1024)
    assert a == b != c and len(a) == 1024
    assert affinity_text({"prompt": "x" * 5000}, 1024) == "x" * 1024
    assert affinity_text({"prompt": ["x" * 10]}, 1024) == "x" * 10
    assert affinity_text({"prompt": list(range(1000))}, 40) == str(list(range(10)))
    assert affinity_text({"prompt": ["a", "b"]}, 1024) is None  # a batch has no one prefix
    assert affinity_text({"prompt": "x"}, 0) is None


def pool(n: int, slack: int = 2) -> Pool:
    p = Pool("prefill", [f"http://b{i}:8000" for i in range(n)], httpx.Timeout(1.0),
             affinity_slack=slack)
    for b in p.backends:
        b.up = True
    return p


def test_least_outstanding_wins_and_equals_take_turns():
    p = pool(3)
    p.backends[0].outstanding, p.backends[1].outstanding, p.backends[2].outstanding = 2, 0, 1
    assert p.pick() is p.backends[1]
    p.backends[1].outstanding = 1
    assert {p.pick().url for _ in range(4)} == {"http://b1:8000", "http://b2:8000"}


def test_down_backends_are_skipped_and_none_up_names_them():
    p = pool(2)
    p.backends[0].mark_down("health check failed: ConnectError")
    assert all(p.pick() is p.backends[1] for _ in range(5))
    p.backends[1].mark_down("health check answered 500")
    with pytest.raises(NoBackend, match=r"no prefill backend is up \(http://b0:8000: health check "
                                        r"failed: ConnectError; http://b1:8000: health check "
                                        r"answered 500\)"):
        p.pick()


def test_affinity_sticks_until_the_preferred_node_is_overloaded():
    p = pool(4, slack=2)
    keys = [f"system prompt {i}" for i in range(40)]
    chosen = {k: p.pick(k) for k in keys}
    assert len(set(chosen.values())) > 1  # prefixes spread over the nodes
    assert all(p.pick(k) is chosen[k] for k in keys)  # and each sticks to its node
    k = keys[0]
    chosen[k].outstanding = 2
    assert p.pick(k) is chosen[k]  # within the slack
    chosen[k].outstanding = 3
    assert p.pick(k) is not chosen[k]  # too busy: least outstanding instead
    chosen[k].outstanding = 0
    gone = chosen[keys[1]]
    gone.mark_down("x")
    moved = {kk for kk in keys if p.pick(kk) is not chosen[kk]}
    assert moved == {kk for kk in keys if chosen[kk] is gone}  # only the lost node's prefixes


def test_all_backends_down_gives_json_503_naming_them():
    dead_p, dead_d = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    app = create_app(RouterConfig(prefill=[dead_p], decode=[dead_d], health_interval_s=0.2))
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert [b["url"] for b in r.json()["prefill"]] == [dead_p]
        assert "ConnectError" in r.json()["decode"][0]["error"]
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["type"] == "ServiceUnavailable" and dead_p in err["message"]
        assert c.post("/v1/chat/completions", content=b"{").status_code == 400
        assert c.get("/v1/models").status_code == 503
        text = c.get("/metrics").text
        assert f'kvtier_router_backend_up{{backend="{dead_d}",role="decode"}} 0.0' in text
        assert ('kvtier_router_requests_total{endpoint="/v1/completions",status="503"} 1.0'
                in text)


def test_bad_urls_are_refused():
    with pytest.raises(ValueError, match="must start with http"):
        create_app(RouterConfig(prefill=["localhost:8000"], decode=["http://x"]))
    with pytest.raises(ValueError, match="at least one decode"):
        create_app(RouterConfig(prefill=["http://x"], decode=[]))


def test_dns_sources_expand_to_one_backend_per_address():
    import asyncio

    async def run() -> tuple[list[str], str]:
        p = Pool("decode", ["dns+http://localhost:8123", "http://10.0.0.9:8000"],
                 httpx.Timeout(1.0))
        assert [b.url for b in p.backends] == ["http://10.0.0.9:8000"]
        await p.discover()
        urls = [b.url for b in p.backends]
        gone = Pool("prefill", ["dns+http://no-such-host.invalid:8000"], httpx.Timeout(1.0))
        await gone.discover()
        with pytest.raises(NoBackend) as e:
            gone.require()
        await p.aclose()
        return urls, str(e.value)

    urls, msg = asyncio.run(run())
    assert urls[0] == "http://10.0.0.9:8000" and "http://127.0.0.1:8123" in urls
    assert msg == ("no prefill backend is up (none found at "
                   "dns+http://no-such-host.invalid:8000)")


def test_k8s_router_manifest_reaches_every_vllm_pod():
    """deploy/k8s/router.yaml: its args are a valid `kvtier router` command line, and its
    headless Services select the vLLM pods on their serving port."""
    from pathlib import Path

    import typer

    from kvtier.cli import app as cli

    yaml = pytest.importorskip("yaml")
    k8s = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
    docs = [d for f in ("router.yaml", "vllm-prefill.yaml", "vllm-decode.yaml")
            for d in yaml.safe_load_all((k8s / f).read_text()) if d]
    deploys = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    (c,) = deploys["kvtier-router"]["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["kvtier", "router"]
    cmd = typer.main.get_command(cli).get_command(None, "router")
    params = cmd.make_context("router", c["args"][2:]).params
    assert c["readinessProbe"]["httpGet"]["port"] == params["port"]
    for role in ("prefill", "decode"):
        (url,) = params[role]
        Pool(role, [url], httpx.Timeout(1.0))  # a valid source
        svc = services[httpx.URL(url.removeprefix("dns+")).host]
        assert svc["spec"]["clusterIP"] == "None"  # one address per pod
        pod = deploys[f"vllm-{role}"]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (vllm,) = pod["spec"]["containers"]
        (port,) = svc["spec"]["ports"]
        assert port["port"] == httpx.URL(url.removeprefix("dns+")).port
        assert port["targetPort"] in {p["containerPort"] for p in vllm["ports"]}
