"""Replay a trace through the real tier code, without an engine.

Keys are vLLM block hashes (:mod:`kvtier.hashing`) under :class:`~kvtier.keys.BlockKey`;
lookups are :func:`kvtier.lookup.deepest_restorable` through a real
:class:`~kvtier.backends.memory.MemoryBackend` holding sized dummy payloads
with the chosen eviction plug-in; the admission policy decides chunk ends and
which offered states are saved. One attention group and one state group stand
for all of the model's (bytes summed). No engine-local prefix cache: every hit
counted is a hit on the tier.

vLLM align mode is emulated as far as states are concerned: a state exists at
a boundary only where a prefill chunk ends there (the policy's chunk end, vLLM's
own chunk budget ``chunk_tokens`` aligned down to a boundary, the last boundary
before the prompt's last token, the prompt's end if aligned; as vLLM 0.32's
``Scheduler._mamba_block_aligned_split``) or where decode crosses one. A hit is
capped so that at least one prompt token is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.admission import AdmissionPolicy, RequestView, make_admission
from kvtier.backends.base import PutItem
from kvtier.backends.eviction import EvictionPolicy, make_policy
from kvtier.backends.memory import MemoryBackend
from kvtier.hashing import prompt_block_hashes
from kvtier.keys import BlockKey, Namespace
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery
from kvtier.sim.models import ModelSpec
from kvtier.sim.traces import Request

ATTN, STATE = 0, 1
GROUPS = (GroupQuery(ATTN, GroupKind.ATTENTION), GroupQuery(STATE, GroupKind.STATE))


class SizedBlob(bytes):
    """A one-byte payload that says it is ``n`` bytes long: the store accounts
    for the real size without holding it."""

    def __new__(cls, n: int) -> SizedBlob:
        obj = super().__new__(cls, b"\0")
        obj.n = n  # type: ignore[attr-defined]
        return obj

    def __len__(self) -> int:
        return self.n  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Prepared:
    """A request with its block hashes (prompt + processed output tokens)."""

    num_prompt_tokens: int
    num_output_tokens: int
    hashes: tuple[bytes, ...]


def prepare(reqs: Sequence[Request], block_tokens: int, seed: str = "0") -> list[Prepared]:
    """Hash each request once (policy-independent; reuse it across replays)."""
    out = []
    for r in reqs:
        ids = r.token_ids()
        processed = max(r.num_prompt_tokens + r.num_output_tokens - 1, r.num_prompt_tokens)
        h = prompt_block_hashes(ids[:processed], block_tokens, "sha256", seed)
        out.append(Prepared(r.num_prompt_tokens, r.num_output_tokens, tuple(h)))
    return out


def restorable_hashes(prepared: Sequence[Prepared], block_tokens: int) -> list[tuple[bytes, ...]]:
    """Per request, the prefix hashes a lookup may restore (at least one token computed)."""
    return [p.hashes[:(p.num_prompt_tokens - 1) // block_tokens] for p in prepared]


def working_set_bytes(prepared: Sequence[Prepared], model: ModelSpec) -> int:
    """Bytes of every distinct boundary with its attention block and a state
    (what dense checkpoints would store with no eviction)."""
    distinct = {h for p in prepared for h in p.hashes}
    return len(distinct) * (model.attention_block_bytes + model.state_bytes)


@dataclass
class SimResult:
    requests: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    upload_bytes: int = 0  # everything the engines send to the tier
    written_bytes: int = 0  # what the tier had to store (not there before)
    state_written_bytes: int = 0
    states_saved: int = 0
    chunk_ends_moved: int = 0  # chunk ends the policy added to vLLM's own
    evictions: int = 0
    hits: list[int] = field(default_factory=list)  # hit tokens per request

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def bytes_per_hit_token(self) -> float:
        return self.written_bytes / self.hit_tokens if self.hit_tokens else float("inf")

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "hits"}
        d.update(token_hit_rate=self.token_hit_rate, bytes_per_hit_token=self.bytes_per_hit_token)
        return d


class Simulator:
    """One tier (a MemoryBackend of ``capacity_bytes``) serving a stream of requests."""

    def __init__(self, model: ModelSpec, admission: str | AdmissionPolicy = "default",
                 eviction: str | EvictionPolicy = "value", capacity_bytes: int = 1 << 50,
                 chunk_tokens: int = 8192, in_chunk_checkpoints: bool = False,
                 save_decoded: bool = True) -> None:
        self.model = model
        self.admission = (make_admission(admission) if isinstance(admission, str)
                          else admission)
        self.policy = make_policy(eviction) if isinstance(eviction, str) else eviction
        self.store = MemoryBackend(capacity_bytes, policy=self.policy)
        self.chunk_tokens = max(chunk_tokens, model.block_tokens)
        self.in_chunk = in_chunk_checkpoints
        self.save_decoded = save_decoded
        self.ns = Namespace(model.name, "kvtier-sim").id
        self._attn_blob = SizedBlob(model.attention_block_bytes)
        self._state_blob = SizedBlob(model.state_bytes)
        self.result = SimResult()

    def key(self, group: int, h: bytes) -> bytes:
        return BlockKey(self.ns, 0, group, h).encode()

    def run(self, prepared: Sequence[Prepared]) -> SimResult:
        advance = getattr(self.policy, "advance", None)  # a policy that knows the future
        for i, p in enumerate(prepared):
            if advance is not None:
                advance(i)
            self.step(p)
        self.result.evictions = self.store.stats().evictions
        return self.result

    def step(self, p: Prepared) -> int:
        """Serve one request; returns its hit tokens."""
        B, P = self.model.block_tokens, p.num_prompt_tokens
        prompt_b = P // B
        res = self.store.lookup(LookupQuery(self.ns, 0, p.hashes[:prompt_b], 1, GROUPS,
                                            max_boundary=(P - 1) // B))
        hit = res.boundary
        if hit:  # the restore reads every block it needs (recency, hit counts)
            self.store.get_many([self.key(ATTN, h) for h in p.hashes[:hit]]
                                + [self.key(STATE, p.hashes[hit - 1])])
        view = RequestView(P, B, hit, (res.junction,) if res.junction else (), False,
                           self.model.state_bytes, self.model.kv_bytes_per_token,
                           self.in_chunk)
        offered = [(b, False) for b in self._prefill_states(view, hit * B)]
        last = len(p.hashes) if self.save_decoded else min(prompt_b, len(p.hashes))
        offered += [(b, True) for b in range(prompt_b + 1, last + 1)]
        items: list[PutItem] = []
        states = {b for b, decode in offered if self.admission.admit_state(view, b, decode)}
        for b in range(hit + 1, last + 1):
            a = self.key(ATTN, p.hashes[b - 1])
            items.append(PutItem(a, self._attn_blob,
                                 self.key(ATTN, p.hashes[b - 2]) if b > 1 else None))
            if b in states:
                items.append(PutItem(self.key(STATE, p.hashes[b - 1]), self._state_blob, a))
        self._save(items)
        r = self.result
        r.requests += 1
        r.prompt_tokens += P
        r.hit_tokens += hit * B
        r.hits.append(hit * B)
        r.states_saved += len(states)
        return hit * B

    def _prefill_states(self, view: RequestView, pos: int) -> list[int]:
        """Boundaries at which the prefill's chunks end (where a state exists)."""
        B, P = view.boundary_tokens, view.num_prompt_tokens
        last_aligned = (P - 1) // B * B  # vLLM's get_mamba_prefill_checkpoint_position
        out = []
        while pos < P:
            natural = P if pos + self.chunk_tokens >= P else (pos + self.chunk_tokens) // B * B
            end = min(natural, last_aligned) if last_aligned > pos else natural
            forced = self.admission.chunk_end(view, pos)
            if forced is not None and pos < forced < end:
                end = forced
                self.result.chunk_ends_moved += 1
            if end % B == 0:
                out.append(end // B)
            pos = end
        return out

    def _save(self, items: list[PutItem]) -> None:
        if not items:
            return
        there = self.store.contains_many([it.key for it in items])
        r = self.result
        for it, had in zip(items, there):
            n = len(it.value)
            r.upload_bytes += n
            if not had:
                r.written_bytes += n
                if it.value is self._state_blob:
                    r.state_written_bytes += n
        self.store.put_many(items)


def simulate(reqs: Sequence[Request] | Sequence[Prepared], model: ModelSpec,
             **kwargs: object) -> SimResult:
    """Replay ``reqs`` (Requests, or Prepared from :func:`prepare`) on a fresh tier."""
    prepared = [r if isinstance(r, Prepared) else None for r in reqs]
    if any(p is None for p in prepared):
        prepared = prepare(reqs, model.block_tokens)  # type: ignore[arg-type]
    return Simulator(model, **kwargs).run(prepared)  # type: ignore[arg-type]


def predict_hit_tokens(requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                       boundary_tokens: int, state_bytes_per_boundary: int,
                       kv_bytes_per_token: int, admission: str = "default",
                       eviction: str = "value", capacity_bytes: int = 1 << 50,
                       chunk_tokens: int = 8192, in_chunk_checkpoints: bool = False,
                       save_decoded: bool = True) -> list[int]:
    """Tokens each request (prompt ids, output ids), run in order, should restore from
    the tier: the simulator's prediction to compare with a real engine's."""
    model = ModelSpec("predict", boundary_tokens, state_bytes_per_boundary, kv_bytes_per_token)
    reqs = [Request(prompt_tokens=tuple(p), output_tokens=tuple(o)) for p, o in requests]
    return simulate(reqs, model, admission=admission, eviction=eviction,
                    capacity_bytes=capacity_bytes, chunk_tokens=chunk_tokens,
                    in_chunk_checkpoints=in_chunk_checkpoints,
                    save_decoded=save_decoded).hits
