"""``kvtier router`` in front of real ``vllm serve`` API servers, through the OpenAI client.

One prefill server (KVTierConnector, ``kv_producer``), one decode server
(``kv_consumer``), both on a real tier, and a reference server without a connector.
The decode node computes the last prompt token as a one-token decode step, which
rounds differently from a cold prefill (``kvtier.testing.reference``), so PD tokens
are compared with the one-engine split reference, asked of the reference server
through its OpenAI API (``ApiServer.split_reference``). The router is the real CLI
process. Later tests lose backends on purpose (the reference server doubles as a
second prefill node that is killed), so they run last.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("openai")

from kvtier.testing.api_server import (  # noqa: E402
    REFERENCE_PROCESSOR,
    ApiServer,
    Query,
    ask,
    kv_transfer_config,
    server_args,
)
from kvtier.testing.router_proc import RouterProcess  # noqa: E402
from kvtier.testing.tier_proc import TierProcess  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
MAX_TOKENS = 12
# Decode's wait for a hand-off upload still in flight: the default (1 s) is for real
# hosts; here 2 shared cores run three servers (and other tests), so an upload can lag.
HANDOFF_WAIT_S = 30.0
SLOW_MACHINE = ("--prefill-timeout", "1200", "--decode-timeout", "1200")  # 2 shared cores


@pytest.fixture(scope="module")
def pd_tier() -> Iterator[TierProcess]:
    """A tier of this module's own: one namespace, nothing from other tests."""
    with TierProcess(capacity="2GiB") as t:
        yield t


@pytest.fixture(scope="module")
def servers(model_path: Path, pd_tier: TierProcess) -> Iterator[dict[str, ApiServer]]:
    url = pd_tier.url
    s = {
        "prefill": ApiServer(server_args(model_path, kv_transfer_config(url, "kv_producer")),
                             "pd-prefill"),
        "decode": ApiServer(server_args(model_path, kv_transfer_config(
            url, "kv_consumer", handoff_wait_s=HANDOFF_WAIT_S)), "pd-decode"),
        "ref": ApiServer(server_args(model_path, logits_processors=(REFERENCE_PROCESSOR,)),
                         "pd-ref"),
    }
    for x in s.values():  # ~25 s each: start all, then wait
        x.start()
    try:
        for x in s.values():
            x.wait_ready(900)
        yield s
    finally:
        for x in s.values():
            x.stop()


@pytest.fixture(scope="module")
def router(servers: dict[str, ApiServer]) -> Iterator[RouterProcess]:
    with RouterProcess([servers["prefill"].url], [servers["decode"].url],
                       "--health-interval", "1", *SLOW_MACHINE) as r:
        r.wait_health(lambda status, _: status == 200)
        yield r


def prompt(seed: int, words: int = 300) -> str:
    """About 5 tokens a word: 300 words are ~1500 tokens, four 384-token blocks."""
    rng = random.Random(seed)
    vocab = ["cache", "tier", "state", "block", "token", "prefill", "decode", "model", "layer",
             "hybrid", "attention", "recurrent", "shared", "cluster", "node", "restore"]
    return " ".join(rng.choice(vocab) + str(rng.randrange(100)) for _ in range(words))


def query(seed: int, chat: bool, words: int = 300) -> Query:
    text = prompt(seed, words)
    if not chat:
        return text
    return [{"role": "system", "content": "You route tokens."},
            {"role": "user", "content": text}]


def reference(servers: dict[str, ApiServer], model: str, q: Query) -> list[int]:
    """What a PD decode must answer: the split reference of the prompt as decode sees it."""
    ref = servers["ref"]
    return ref.split_reference(model, ref.tokenize(q), MAX_TOKENS)


@pytest.fixture(scope="module")
def model(servers: dict[str, ApiServer]) -> str:
    return httpx.get(f"{servers['ref'].url}/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_router_tokens_equal_the_split_reference(router, servers, model, chat, stream):
    q = query(100 + 2 * chat + stream, chat)
    want = reference(servers, model, q)
    got = ask(router.url, model, q, stream, MAX_TOKENS)
    assert len(want) == MAX_TOKENS
    assert got.token_ids == want
    assert got.text and got.headers["x-kvtier-decode"] == servers["decode"].url


def test_eight_concurrent_requests_equal_the_split_reference(router, servers, model):
    cases = [(query(200 + i, bool(i % 2), words=100), bool(i // 2 % 2)) for i in range(8)]
    want = [reference(servers, model, q) for q, _ in cases]
    before = servers["decode"].prompt_tokens_by_source()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: ask(router.url, model, *c, MAX_TOKENS), cases))
    assert [g.token_ids for g in got] == want
    delta = by_source(servers["decode"], before)
    assert delta.get("local_compute") == len(cases), delta  # the last prompt token each
    metrics = httpx.get(f"{router.url}/metrics").text
    assert 'kvtier_router_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert f'kvtier_router_backend_outstanding{{backend="{servers["decode"].url}"' in metrics


def by_source(server: ApiServer, before: dict[str, float]) -> dict[str, float]:
    after = server.prompt_tokens_by_source()
    return {k: after[k] - before.get(k, 0.0) for k in after}


def test_decode_node_loads_from_the_tier(router, servers, model):
    """What a PD decode node computes itself (vLLM's prompt_tokens_by_source, design notes §7):
    the last prompt token, N - 1 come from the tier. The first request is the plain race
    a router creates (decode sent the moment prefill answers, uploads in flight): decode
    waits for the hand-off itself. The second repeats it on an emptied decode cache."""
    d = servers["decode"]
    text = prompt(300, words=600)
    ids = servers["ref"].tokenize(text)
    want = servers["ref"].split_reference(model, ids, MAX_TOKENS)
    body = {"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    for attempt in ("raced", "again"):
        before = d.prompt_tokens_by_source()
        r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=1500)
        assert r.status_code == 200, r.text
        assert (r.headers["x-kvtier-prefill"], r.headers["x-kvtier-decode"]) == (
            servers["prefill"].url, d.url)
        assert r.json()["choices"][0]["token_ids"] == want
        delta = by_source(d, before)
        print(f"decode node, {attempt} PD request of {len(ids)} prompt tokens: {delta}")
        assert len(ids) == r.json()["usage"]["prompt_tokens"]
        assert delta.get("local_compute") == 1, delta
        assert delta.get("external_kv_transfer") == len(ids) - 1, delta
        d.reset_prefix_cache()
    handoffs = [ln for ln in httpx.get(f"{router.url}/metrics").text.splitlines()
                if ln.startswith("kvtier_router_kv_transfer_params_total")]
    print("router: prefill answers with/without kv_transfer_params:", handoffs)


def test_prefill_failure_is_an_error_not_a_hang(router, model):
    r = httpx.post(f"{router.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt(1, words=6000), "max_tokens": 4})
    assert r.status_code == 400  # vLLM's own answer (prompt too long), passed on
    assert "error" in r.json()


def test_prefill_timeout_names_the_backend(servers, model):
    with RouterProcess([servers["prefill"].url], [servers["decode"].url],
                       "--prefill-timeout", "0.01") as r:
        r.wait_health(lambda status, _: status == 200)
        t0 = time.monotonic()
        resp = httpx.post(f"{r.url}/v1/completions", timeout=60, json={
            "model": model, "prompt": prompt(2), "max_tokens": 4})
        assert time.monotonic() - t0 < 30
    assert resp.status_code == 504
    err = resp.json()["error"]
    assert err["backend"] == servers["prefill"].url and "did not answer within" in err["message"]


def test_killed_prefill_backend_is_skipped(servers, model):
    """Two prefill nodes (the reference server as the second one); one is killed."""
    p, spare = servers["prefill"], servers["ref"]
    text = prompt(400)
    want = spare.split_reference(model, spare.tokenize(text), MAX_TOKENS)
    with RouterProcess([spare.url, p.url], [servers["decode"].url], "--health-interval", "1",
                       "--affinity-chars", "0", *SLOW_MACHINE) as r:
        r.wait_health(lambda s, b: all(x["up"] for x in b["prefill"]))
        spare.kill()
        # At once, before a health check notices: the turn would fall to the dead node,
        # which refuses; the router marks it down and uses the live one.
        for _ in range(3):
            resp = httpx.post(f"{r.url}/v1/completions", timeout=1500, json={
                "model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-kvtier-prefill"] == p.url
            assert resp.json()["choices"][0]["token_ids"] == want
        status, body = r.health()
        assert status == 200 and not body["prefill"][0]["up"], body
        assert body["prefill"][0]["url"] == spare.url


def test_decode_down_gives_a_clear_503(router, servers, model):
    d = servers["decode"]
    d.kill()
    body = router.wait_health(lambda s, _: s == 503)
    assert body["decode"][0]["url"] == d.url and not body["decode"][0]["up"]
    r = httpx.post(f"{router.url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailable"
    assert f"no decode backend is up ({d.url}: health check failed" in err["message"]
