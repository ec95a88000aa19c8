"""Lookups over gRPC answer exactly what the in-process algorithm answers on the same store,
though the client sends only the hashes that close a block."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.backends.memory import MemoryBackend
from kvtier.keys import BlockKey
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery, StopReason
from tests.helpers.servers import TierProcess


@pytest.fixture(scope="module")
def client(tier_server: TierProcess) -> Iterator[GrpcBackend]:
    with GrpcBackend(tier_server.url, timeout_s=10.0) as b:
        yield b


def _answer(r: Any) -> tuple:
    return r.boundary, r.reason, r.attention_boundary, [
        (d.boundary, d.num_hashes, dict(d.present), d.prefix_ok) for d in r.details]


def _store(rng: random.Random, ns: bytes, hashes: list[bytes], groups: list[GroupQuery],
           per_boundary: int, keep: float) -> list[PutItem]:
    """Every block of every group, each kept with probability ``keep`` (parents linked)."""
    items = []
    for g in groups:
        parent = None
        for i in range(len(hashes) // g.hashes_per_block):
            key = BlockKey(ns, 0, g.group_id, hashes[(i + 1) * g.hashes_per_block - 1]).encode()
            if rng.random() < keep:
                items.append(PutItem(key, b"v%d" % i, parent))
            parent = key if g.kind is GroupKind.ATTENTION else None
    return items


@pytest.mark.parametrize("seed", range(8))
def test_random_stores_and_queries_match_the_local_answer(client: GrpcBackend, seed: int) -> None:
    rng = random.Random(seed)
    per_boundary = rng.choice([4, 6, 12, 24])
    divisors = [d for d in range(1, per_boundary + 1) if per_boundary % d == 0]
    # Spans share a factor most of the time, so the client's hash thinning is exercised.
    unit = rng.choice(divisors[:-1]) if seed % 4 else 1
    spans = [d for d in divisors if d % unit == 0]
    groups = [GroupQuery(0, GroupKind.ATTENTION, rng.choice(spans))]
    groups += [GroupQuery(gid, GroupKind.STATE, rng.choice(spans)) for gid in (1, 2)]
    ns = os.urandom(16)
    hashes = [rng.randbytes(32) for _ in range(per_boundary * 10 + rng.randrange(per_boundary))]
    items = _store(rng, ns, hashes, groups, per_boundary, keep=rng.choice([0.9, 0.97, 1.0]))
    local = MemoryBackend(1 << 30)
    local.put_many(items)
    client.put_many(items)
    for start, cap in [(0, None), (0, 0), (0, 3), (2, None), (4, 2), (5, 7), (12, None)]:
        for details in (False, True):
            q = LookupQuery(ns, 0, hashes, per_boundary, groups, start, cap)
            assert _answer(client.lookup(q, details)) == _answer(local.lookup(q, details)), (
                per_boundary, [g.hashes_per_block for g in groups], start, cap)


def test_only_block_closing_hashes_are_sent(client: GrpcBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """128K tokens at 16-token hashes (8192) with 384-token blocks: 341 hashes on the wire."""
    ns = os.urandom(16)
    hashes = [os.urandom(32) for _ in range(8192)]
    groups = [GroupQuery(g, GroupKind.STATE, 24) for g in range(3)]
    groups.append(GroupQuery(3, GroupKind.ATTENTION, 24))
    items = _store(random.Random(0), ns, hashes, groups, 24, keep=1.0)
    client.put_many(items)
    sent = []
    real = client._stub.Lookup

    def spy(req: Any, **kw: Any) -> Any:
        sent.append(req)
        return real(req, **kw)

    monkeypatch.setattr(client._stub, "Lookup", spy)
    r = client.lookup(LookupQuery(ns, 0, hashes, 24, groups))
    assert (r.boundary, r.reason) == (341, StopReason.FULL)
    assert len(sent) == 1 and len(sent[0].hashes_packed) == 341 * 32
    assert sent[0].hashes_per_boundary == 1 and {g.hashes_per_block for g in sent[0].groups} == {1}
    # A group spanning 2 hashes keeps every second hash (gcd of the spans), not every 24th.
    mixed = [GroupQuery(3, GroupKind.ATTENTION, 2), *groups[:3]]
    r = client.lookup(LookupQuery(ns, 0, hashes, 24, mixed))
    assert len(sent[-1].hashes_packed) == 4096 * 32
    assert (r.boundary, r.reason) == (0, StopReason.MISSING_ATTENTION)


def test_nothing_to_ask_costs_no_round_trip(client: GrpcBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("no lookup should reach the server")

    monkeypatch.setattr(client._stub, "Lookup", refuse)
    hashes = [os.urandom(32) for _ in range(8)]
    groups = [GroupQuery(0, GroupKind.ATTENTION)]
    for q in (LookupQuery(os.urandom(16), 0, hashes, 1, groups, max_boundary=0),
              LookupQuery(os.urandom(16), 0, hashes, 1, groups, start_boundary=8),
              LookupQuery(os.urandom(16), 0, hashes, 1, [], start_boundary=3)):
        r = client.lookup(q)
        assert (r.boundary, r.reason) == (q.start_boundary, StopReason.NOTHING_TO_LOOK_UP)
