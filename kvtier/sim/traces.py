"""Deterministic request traces and the JSONL trace format.

A request is a prompt made of named segments plus the segment its decode
writes: equal names mean equal tokens, so a chat's next turn is the previous
prompt + the previous output + a new user message, and users of one system
prompt share its segment. One JSON object per line::

    {"prompt": [["sys0", 1200], ["c3.u0", 230]], "output": ["c3.a0", 310], "session": "c3"}

or, with explicit token ids (for replaying what a real engine ran)::

    {"prompt_tokens": [1, 2, 3], "output_tokens": [4, 5]}

Lengths are drawn from log-normal shapes like those of public chat and agent
datasets (short user turns with a heavy tail, answers of a few hundred
tokens, tool results of a few hundred to many thousand); parameters, not fits.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Segment = tuple[str, int]
VOCAB = 100_000


@dataclass(frozen=True)
class Request:
    prompt: tuple[Segment, ...] = ()
    output: Segment = ("", 0)
    session: str = ""
    prompt_tokens: tuple[int, ...] | None = None  # explicit ids instead of segments
    output_tokens: tuple[int, ...] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return len(self.prompt_tokens)
        return sum(n for _, n in self.prompt)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_tokens) if self.output_tokens is not None else self.output[1]

    def token_ids(self) -> list[int]:
        """Prompt + output token ids (segments expanded deterministically)."""
        if self.prompt_tokens is not None:
            return [*self.prompt_tokens, *(self.output_tokens or ())]
        segs = [*self.prompt, self.output] if self.output[1] else list(self.prompt)
        return np.concatenate([segment_tokens(s) for s in segs]).tolist() if segs else []

    def to_json(self) -> dict:
        if self.prompt_tokens is not None:
            return {"prompt_tokens": list(self.prompt_tokens),
                    "output_tokens": list(self.output_tokens or ())}
        d: dict = {"prompt": [list(s) for s in self.prompt], "output": list(self.output)}
        if self.session:
            d["session"] = self.session
        return d

    @classmethod
    def from_json(cls, d: dict) -> Request:
        if "prompt_tokens" in d:
            return cls(prompt_tokens=tuple(int(t) for t in d["prompt_tokens"]),
                       output_tokens=tuple(int(t) for t in d.get("output_tokens", ())))
        out = d.get("output", ["", 0])
        return cls(tuple((str(n), int(k)) for n, k in d["prompt"]), (str(out[0]), int(out[1])),
                   str(d.get("session", "")))


_SEG_CACHE: dict[Segment, np.ndarray] = {}


def segment_tokens(seg: Segment) -> np.ndarray:
    """The token ids of a named segment: a pure function of its name and length."""
    arr = _SEG_CACHE.get(seg)
    if arr is None:
        seed = int.from_bytes(hashlib.sha256(seg[0].encode()).digest()[:8], "little")
        arr = np.random.default_rng(seed).integers(0, VOCAB, seg[1], dtype=np.int64)
        _SEG_CACHE[seg] = arr
    return arr


def read_trace(path: str | Path) -> list[Request]:
    with open(path) as f:
        return [Request.from_json(json.loads(line)) for line in f if line.strip()]


def write_trace(path: str | Path, reqs: Iterable[Request]) -> None:
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")


# -- generators --------------------------------------------------------------
@dataclass(order=True)
class _Timed:
    t: float
    order: int
    req: Request = field(compare=False)


def _lognormal(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))


def _sessions(n_requests: int, rng: np.random.Generator, make) -> list[Request]:  # noqa: ANN001
    """Sessions start uniformly over an hour and run their turns after think times;
    their requests are merged in time order until ``n_requests``."""
    timed: list[_Timed] = []
    order = 0
    s = 0
    while order < n_requests:
        t = float(rng.uniform(0, 3600))
        for req in make(s, rng):
            timed.append(_Timed(t, order, req))
            order += 1
            t += float(rng.exponential(60.0))
        s += 1
    return [x.req for x in heapq.nsmallest(n_requests, timed)]


def chat(n_requests: int = 400, seed: int = 0, tag: str = "chat") -> list[Request]:
    """Multi-turn chats: a few shared system prompts, each turn extends the last."""
    rng = np.random.default_rng([seed, 1])
    systems = [(f"{tag}.sys{k}", n) for k, n in enumerate((250, 900, 1800))]

    def make(s: int, rng: np.random.Generator) -> Iterator[Request]:
        sid = f"{tag}.c{s}"
        prompt: list[Segment] = [systems[int(rng.integers(len(systems)))]]
        turns = min(1 + int(rng.geometric(0.25)), 16)
        for i in range(turns):
            user = _lognormal(rng, 120, 1.0, 4, 6000)
            if i == 0 and rng.random() < 0.15:  # a pasted document
                user += _lognormal(rng, 3000, 0.8, 500, 24000)
            prompt.append((f"{sid}.u{i}", user))
            out = (f"{sid}.a{i}", _lognormal(rng, 280, 0.7, 8, 2500))
            yield Request(tuple(prompt), out, sid)
            prompt.append(out)

    return _sessions(n_requests, rng, make)


def agentic(n_requests: int = 400, seed: int = 0, tag: str = "agent") -> list[Request]:
    """Tool loops: each step appends the model's tool call and the tool's result."""
    rng = np.random.default_rng([seed, 2])
    tools = [(f"{tag}.tools{k}", n) for k, n in enumerate((4000, 6500, 9000))]

    def make(s: int, rng: np.random.Generator) -> Iterator[Request]:
        sid = f"{tag}.s{s}"
        prompt: list[Segment] = [tools[int(rng.integers(len(tools)))],
                                 (f"{sid}.task", _lognormal(rng, 300, 0.8, 20, 4000))]
        steps = min(1 + int(rng.geometric(0.08)), 40)
        for i in range(steps):
            out = (f"{sid}.call{i}", _lognormal(rng, 150, 0.6, 10, 1500))
            yield Request(tuple(prompt), out, sid)
            prompt += [out, (f"{sid}.tool{i}", _lognormal(rng, 700, 1.1, 20, 16000))]
            if sum(n for _, n in prompt) > 120_000:
                return

    return _sessions(n_requests, rng, make)


def sysprompt(n_requests: int = 400, seed: int = 0, tag: str = "sys") -> list[Request]:
    """Many users of a few long shared prompts (instructions, few-shot, a document);
    Zipf popularity; some users ask one follow-up."""
    rng = np.random.default_rng([seed, 3])
    k = 8
    systems = [(f"{tag}.p{j}", _lognormal(rng, 6000, 0.6, 1000, 32000)) for j in range(k)]
    weights = 1.0 / np.arange(1, k + 1) ** 1.1
    weights /= weights.sum()

    def make(s: int, rng: np.random.Generator) -> Iterator[Request]:
        sid = f"{tag}.u{s}"
        prompt: list[Segment] = [systems[int(rng.choice(k, p=weights))]]
        for i in range(1 + int(rng.random() < 0.2)):
            prompt.append((f"{sid}.q{i}", _lognormal(rng, 150, 0.8, 4, 3000)))
            out = (f"{sid}.a{i}", _lognormal(rng, 200, 0.7, 8, 2000))
            yield Request(tuple(prompt), out, sid)
            prompt.append(out)

    return _sessions(n_requests, rng, make)


def mix(n_requests: int = 400, seed: int = 0) -> list[Request]:
    """A third of each, interleaved (round robin keeps each source's own order)."""
    parts = [g(n_requests // 3 + (i < n_requests % 3), seed)
             for i, g in enumerate((chat, agentic, sysprompt))]
    out: list[Request] = []
    for i in range(max(len(p) for p in parts)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


GENERATORS = {"chat": chat, "agentic": agentic, "sysprompt": sysprompt, "mix": mix}


def generate(name: str, n_requests: int = 400, seed: int = 0) -> list[Request]:
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown trace {name!r}; choose one of {sorted(GENERATORS)}") from None
    return gen(n_requests, seed)
