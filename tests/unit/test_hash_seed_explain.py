"""``kvtier explain`` names a hash-seed mismatch instead of "nothing stored".

Engines seeded differently (``PYTHONHASHSEED``, which vLLM 0.32 uses for sha256
too) compute different block hashes and so write different namespaces. The
tier here is a real ``kvtier serve``; namespaces and manifests come from the
connector's own :class:`CacheLayout` under each seed, blocks are keyed by the
prompt's hashes under that seed, as an engine would store them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

pytest.importorskip("vllm")

from kvtier.connectors.vllm.layout import CacheLayout  # noqa: E402

from kvtier import payload  # noqa: E402
from kvtier.backends import open_backend  # noqa: E402
from kvtier.backends.base import PutItem  # noqa: E402
from kvtier.hashing import prompt_block_hashes  # noqa: E402
from kvtier.keys import BlockKey, manifest_key  # noqa: E402
from kvtier.lookup import GroupKind  # noqa: E402
from kvtier.testing.tier_proc import TierProcess  # noqa: E402
from kvtier.testing.tiny_model import make_prompt_token_ids  # noqa: E402
from tests.unit.test_cli import invoke, kvtier  # noqa: E402
from tests.unit.test_connector_layout import layout_with_seed  # noqa: E402

PROMPT = make_prompt_token_ids(2000, 11, 4096)  # 5 restorable 384-token boundaries


def store(url: str, layout: CacheLayout, tokens: list[int], seed: str) -> None:
    """The manifest, and every block of ``tokens`` hashed with ``seed`` (states hang off
    the attention block of their boundary)."""
    ns = layout.namespace().id
    hashes = prompt_block_hashes(tokens, layout.hash_block_size, layout.hash_algo, seed)
    items = [PutItem(manifest_key(ns), layout.manifest().to_bytes())]
    for b in range((len(tokens) - 1) // layout.scheduler_block_size):
        h = layout.block_hash(hashes, layout.anchor, b)
        anchor = BlockKey(ns, 0, layout.anchor.group_id, h)
        for g in sorted(layout.groups, key=lambda g: g.kind is not GroupKind.ATTENTION):
            k = BlockKey(ns, 0, g.group_id, h)
            items.append(PutItem(k.encode(), payload.encode(k, b"l" * 8, b"x" * 64),
                                 None if k == anchor else anchor.encode()))
    with open_backend(url) as t:
        assert t.put_many(items) == len(items)


@pytest.fixture
def tier() -> Iterator[str]:
    with TierProcess(capacity="64MiB") as t:
        yield t.url


def explain(url: str, ns: str) -> dict:
    r = invoke("explain", "--url", url, "-n", ns, "--token-ids", ",".join(map(str, PROMPT)),
               "--json")
    assert r.code == 0, r.stderr
    return json.loads(r.stdout)


def test_explain_names_the_seed_that_holds_the_prompt(tier, monkeypatch):
    one, two = layout_with_seed(monkeypatch, "1"), layout_with_seed(monkeypatch, "2")
    assert one.namespace().id != two.namespace().id
    store(tier, one, PROMPT, "1")
    store(tier, two, make_prompt_token_ids(2000, 12, 4096), "2")  # node 2 served another prompt
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # explain's own seed is neither

    rep = explain(tier, two.namespace().hex)
    assert rep["hit_tokens"] == 0
    assert rep["why"].startswith("hash seed mismatch: namespace " + one.namespace().hex), rep["why"]
    assert "set PYTHONHASHSEED=1 the same on every node" in rep["why"]
    assert "nothing of this prompt is stored" not in rep["why"]
    # The namespace that holds it is explained with its own recorded seed: a full hit.
    assert explain(tier, one.namespace().hex)["hit_tokens"] == 5 * 384


def test_explain_with_an_unrecorded_seed_needs_the_engines_seed(tier, monkeypatch):
    """xxhash keeps its seed secret: only a digest is recorded, explain uses its own."""
    m = layout_with_seed(monkeypatch, "5", "xxhash")
    store(tier, m, PROMPT, "5")
    monkeypatch.setenv("PYTHONHASHSEED", "6")
    rep = explain(tier, m.namespace().hex)
    assert rep["hit_tokens"] == 0 and "hash seed mismatch" in rep["why"], rep["why"]
    assert "run explain with the engines' PYTHONHASHSEED" in rep["why"]
    monkeypatch.setenv("PYTHONHASHSEED", "5")
    assert explain(tier, m.namespace().hex)["hit_tokens"] == 5 * 384


def test_explain_says_a_random_seed_shares_nothing(tier, monkeypatch):
    m = layout_with_seed(monkeypatch, None, "xxhash")
    store(tier, m, PROMPT, "whatever the engine drew")
    rep = explain(tier, m.namespace().hex)
    assert rep["hit_tokens"] == 0
    assert "random per-process seed" in rep["why"] and "no two engines" in rep["why"]


def test_console_script_explains_with_the_recorded_seed(tier, monkeypatch):
    """The executable, whose PYTHONHASHSEED (set by the test run) is not the engines'."""
    m = layout_with_seed(monkeypatch, "3")
    store(tier, m, PROMPT, "3")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    r = kvtier("explain", "--url", tier, "-n", m.namespace().hex, "--token-ids",
               ",".join(map(str, PROMPT)), "--json", timeout=300)
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["hit_tokens"] == 5 * 384 and rep["hash_seed"] == "PYTHONHASHSEED=3"
