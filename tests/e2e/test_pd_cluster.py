"""PD through ``kvtier router`` over network namespaces: a cluster as users run it.

Tier, two prefill (``kv_producer``) and two decode (``kv_consumer``) ``vllm serve``
API servers, each on its own test host (network namespace, real TCP over a bridge);
the router and a reference server (no connector) run on the host, which reaches
every namespace over the bridge. PD tokens are compared with the one-engine split
reference (``kvtier.testing.reference``, asked of the reference server's API): the
decode node computes the last prompt token as a decode step, which rounds unlike a
cold prefill. What each decode node computed itself is read from vLLM's own
``vllm:prompt_tokens_by_source`` (design notes §7); the router says which node
served a request in its ``x-kvtier-prefill`` / ``x-kvtier-decode`` headers.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kvtier.testing import netns
from kvtier.testing.api_server import (
    REFERENCE_PROCESSOR,
    ApiServer,
    Query,
    ask,
    kv_transfer_config,
    server_args,
)
from kvtier.testing.router_proc import RouterProcess
from kvtier.testing.tier_proc import TierProcess
from kvtier.testing.waits import scrape_metrics, wait_restorable, wait_until
from tests.e2e.conftest import BLOCK

pytestmark = [pytest.mark.engine, pytest.mark.netns, pytest.mark.timeout(900)]
if (why := netns.available()) is not None:
    pytest.skip(why, allow_module_level=True)
pytest.importorskip("openai")

PREFILL, DECODE = ("p0", "p1"), ("d0", "d1")
PORT, METRICS = 8000, 9100  # on each node's own address: nothing else binds there
MAX_TOKENS = 12
# Decode's wait for a hand-off still being uploaded. Five servers share 2 cores here, so
# an upload can land seconds after the prefill answers (on real hosts the default 1 s
# is plenty); it also bounds the tier-outage test, where decode gives up and recomputes.
HANDOFF_WAIT_S = 20.0
SLOW_MACHINE = ("--health-interval", "1", "--prefill-timeout", "600",
                "--decode-timeout", "600")


@dataclass
class PDCluster:
    c: netns.Cluster
    tier: TierProcess
    nodes: dict[str, ApiServer]  # p0, p1, d0, d1
    ref: ApiServer
    router: RouterProcess
    model: str

    def by_url(self, url: str) -> str:
        return next(n for n, s in self.nodes.items() if s.url == url)

    def by_source(self) -> dict[str, dict[str, float]]:
        return {n: s.prompt_tokens_by_source() for n, s in self.nodes.items()}

    def reference(self, q: Query | list[int]) -> tuple[list[int], list[int]]:
        """(prompt ids as the decode sees them, the split reference's tokens)."""
        ids = q if is_ids(q) else self.ref.tokenize(q)
        return ids, self.ref.split_reference(self.model, ids, MAX_TOKENS)

    def connector_errors(self, node: str, kind: str) -> float:
        m = scrape_metrics(METRICS, host=self.c.nodes[node])
        return m.get(("kvtier_connector_errors_total", (("kind", kind),)), 0.0)


def is_ids(q: object) -> bool:
    return isinstance(q, list) and all(isinstance(t, int) for t in q)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


@pytest.fixture(scope="module")
def pd(model_path: Path) -> Iterator[PDCluster]:
    with netns.cluster(["tier", *PREFILL, *DECODE]) as c:
        tier = TierProcess(port=7070, host=c.nodes["tier"], launcher=tuple(c.launcher("tier")),
                           extra_args=("--bulk-port", "7071")).start()
        cfg = {**{p: kv_transfer_config(tier.url, "kv_producer") for p in PREFILL},
               **{d: kv_transfer_config(tier.url, "kv_consumer", handoff_wait_s=HANDOFF_WAIT_S,
                                        metrics_port=METRICS) for d in DECODE}}
        nodes = {n: ApiServer(server_args(model_path, cfg[n]), f"pdc-{n}", host=c.nodes[n],
                              port=PORT, launcher=tuple(c.launcher(n))) for n in cfg}
        ref = ApiServer(server_args(model_path, logits_processors=(REFERENCE_PROCESSOR,)),
                        "pdc-ref")
        servers = [*nodes.values(), ref]
        try:
            for s in servers:  # all start at once: ~1-2 min together on 2 cores
                s.start()
            for s in servers:
                s.wait_ready(600)
            model = httpx.get(f"{ref.url}/v1/models").json()["data"][0]["id"]
            with RouterProcess([nodes[p].url for p in PREFILL], [nodes[d].url for d in DECODE],
                               *SLOW_MACHINE) as router:
                router.wait_health(lambda status, _: status == 200)
                yield PDCluster(c, tier, nodes, ref, router, model)
        finally:
            for s in servers:
                s.stop()
            tier.stop()


def words(seed: int, n: int) -> str:
    """About 5 tokens a word."""
    rng = random.Random(seed)
    vocab = ["cache", "tier", "state", "block", "token", "prefill", "decode", "model", "layer",
             "hybrid", "attention", "recurrent", "shared", "cluster", "node", "restore"]
    return " ".join(rng.choice(vocab) + str(rng.randrange(100)) for _ in range(n))


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You route tokens."},
            {"role": "user", "content": text}]


def test_concurrent_pd_requests_compute_one_token_each(pd: PDCluster):
    """8 requests at once (completions and chat, JSON and SSE) over 2 prefill and 2 decode
    hosts: tokens equal the split reference; each decode node computed one prompt token
    per request it served and loaded the other N - 1 from the tier."""
    cases: list[tuple[Query, bool]] = [
        (chat(words(500 + i, 120 + 40 * i)) if i % 2 else words(500 + i, 120 + 40 * i),
         bool(i // 2 % 2)) for i in range(8)]
    refs = [pd.reference(q) for q, _ in cases]
    before = pd.by_source()
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: ask(pd.router.url, pd.model, *c, MAX_TOKENS), cases))
    after = pd.by_source()
    assert [g.token_ids for g in got] == [want for _, want in refs]
    served = Counter(pd.by_url(g.headers["x-kvtier-decode"]) for g in got)
    loaded = Counter()
    for g, (ids, _) in zip(got, refs):
        loaded[pd.by_url(g.headers["x-kvtier-decode"])] += len(ids) - 1
    print("decode nodes served:", dict(served), "prefill nodes:",
          dict(Counter(pd.by_url(g.headers["x-kvtier-prefill"]) for g in got)))
    assert set(served) == set(DECODE), served  # least outstanding spreads 8 requests
    for d in DECODE:
        assert delta(after[d], before[d]) == {"local_compute": served[d],
                                              "external_kv_transfer": loaded[d]}, d


def turn_one(pd: PDCluster, seed: int) -> tuple[list[dict[str, str]], list[int], int]:
    """A chat turn whose decode crosses a block boundary b (N1 < b < N1 + MAX_TOKENS):
    its decode node writes a block (and the state at b) that turn 1's prompt lacks."""
    for n in range(200, 400):
        msgs = chat(words(seed, n))
        ids = pd.ref.tokenize(msgs)
        b = -(-len(ids) // BLOCK) * BLOCK
        if len(ids) < b < len(ids) + MAX_TOKENS - 1:
            return msgs, ids, b
    raise AssertionError("no prompt length puts a block boundary inside the decode")


def test_next_turn_on_the_other_nodes_hits_past_turn_one(pd: PDCluster):
    """Turn 2 of a chat served by the *other* prefill and decode hosts. Under PD its decode
    node loads the whole hand-off anyway, so the meaningful hit is the prefill's: the
    prefill host that never saw turn 1 loads from the tier past turn 1's prompt, i.e. the
    block turn 1's decode host wrote (kv_consumer saves what its decode produced).

    The client keeps the conversation as token ids (turn 1's prompt + its output): a
    random-weight model's text would not re-render through the chat template to the ids
    it generated, and only the exact ids can share blocks."""
    msgs, ids1, b = turn_one(pd, 600)
    _, want1 = pd.reference(msgs)
    t1 = ask(pd.router.url, pd.model, msgs, max_tokens=MAX_TOKENS)
    assert t1.token_ids == want1
    p_a, d_a = (pd.by_url(t1.headers[h]) for h in ("x-kvtier-prefill", "x-kvtier-decode"))
    p_b = next(p for p in PREFILL if p != p_a)
    d_b = next(d for d in DECODE if d != d_a)
    ids2 = ids1 + t1.token_ids + pd.ref.tokenize(" and then? " + words(601, 40))
    wait_restorable(pd.tier.url, ids2, b, timeout_s=120)  # d_a's decode-written block landed
    _, want2 = pd.reference(ids2)
    before = pd.by_source()
    with RouterProcess([pd.nodes[p_b].url], [pd.nodes[d_b].url], *SLOW_MACHINE) as r2:
        r2.wait_health(lambda status, _: status == 200)
        resp = httpx.post(f"{r2.url}/v1/completions", timeout=600, json={
            "model": pd.model, "prompt": ids2, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["token_ids"] == want2
    after = pd.by_source()
    prefill, decode = delta(after[p_b], before[p_b]), delta(after[d_b], before[d_b])
    print(f"turn 1: {len(ids1)} tokens on {p_a}/{d_a}; turn 2: {len(ids2)} tokens on "
          f"{p_b} {prefill} / {d_b} {decode}")
    assert prefill.get("external_kv_transfer", 0) >= b > len(ids1)
    assert "local_cache_hit" not in prefill
    assert decode == {"local_compute": 1, "external_kv_transfer": len(ids2) - 1}


def test_tier_cut_off_during_a_pd_request(pd: PDCluster):
    """The tier host drops off the network while a PD request runs: the prefill cannot
    store the hand-off, decode waits (at most handoff_wait_s) and then computes the whole
    prompt itself, with cold tokens, and the request ends. Back on the network, hand-offs
    work again. Last in this module."""
    text = words(700, 300)
    ids = pd.ref.tokenize(text)
    cold = ask(pd.ref.url, pd.model, text, max_tokens=MAX_TOKENS).token_ids  # no force: cold
    before = pd.by_source()
    errors = {d: {k: pd.connector_errors(d, k) for k in ("handoff_timeout", "handoff_unavailable")}
              for d in DECODE}
    pd.c.link("tier", up=False)
    try:
        got = ask(pd.router.url, pd.model, text, max_tokens=MAX_TOKENS, timeout_s=300)
    finally:
        pd.c.link("tier", up=True)
    assert got.token_ids == cold
    d = pd.by_url(got.headers["x-kvtier-decode"])
    assert delta(pd.by_source()[d], before[d]) == {"local_compute": len(ids)}
    gave_up = {k: pd.connector_errors(d, k) - v for k, v in errors[d].items()}
    print(f"decode {d} gave up on the hand-off: {gave_up}")
    assert sum(gave_up.values()) == 1, gave_up

    attempt = iter(range(1000))

    def handoff_again() -> bool:
        """A fresh PD request; True once its decode loaded the hand-off. One that still
        missed it (a node's back-off after the outage) must have computed cold tokens."""
        q = words(800 + next(attempt), 150)
        ids_q, want = pd.reference(q)
        b0 = pd.by_source()
        r = ask(pd.router.url, pd.model, q, max_tokens=MAX_TOKENS)
        dq = pd.by_url(r.headers["x-kvtier-decode"])
        if delta(pd.by_source()[dq], b0[dq]) == {"local_compute": len(ids_q)}:
            assert r.token_ids == ask(pd.ref.url, pd.model, q, max_tokens=MAX_TOKENS).token_ids
            return False
        assert delta(pd.by_source()[dq], b0[dq]) == {
            "local_compute": 1, "external_kv_transfer": len(ids_q) - 1}
        assert r.token_ids == want
        return True

    wait_until(handoff_again, 180, "a PD hand-off through the tier after the link is back",
               poll_s=1.0)
