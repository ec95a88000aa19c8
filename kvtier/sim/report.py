"""``kvtier sim``: load or generate a trace, replay it, summarise in bytes and tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.config import parse_bytes
from kvtier.sim import replay, traces
from kvtier.sim.clairvoyant import Clairvoyant
from kvtier.sim.models import ModelSpec, get_model

GIB = 1 << 30


def parse_capacity(value: str, working_set: int) -> int:
    """``"20%"`` of the trace's working set, or a size (``"8GiB"``, bytes)."""
    v = value.strip()
    if v.endswith("%"):
        pct = float(v[:-1])
        if pct <= 0:
            raise ValueError(f"capacity must be positive, got {value!r}")
        return max(1, int(working_set * pct / 100))
    return parse_bytes(v)


@dataclass
class Loaded:
    name: str
    model: ModelSpec
    prepared: list[replay.Prepared]
    working_set: int


def load(trace: str | None, gen: str | None, model: str | ModelSpec, requests: int = 400,
         seed: int = 0) -> Loaded:
    if (trace is None) == (gen is None):
        raise ValueError("give exactly one of a trace file or a generator")
    spec = get_model(model) if isinstance(model, str) else model
    reqs = traces.read_trace(trace) if trace else traces.generate(gen, requests, seed)  # type: ignore[arg-type]
    prepared = replay.prepare(reqs, spec.block_tokens)
    return Loaded(trace or gen, spec, prepared, replay.working_set_bytes(prepared, spec))  # type: ignore[arg-type]


def run(loaded: Loaded, capacity: str, admission: str, eviction: str,
        chunk_tokens: int = 8192, in_chunk_checkpoints: bool = False) -> dict:
    cap = parse_capacity(capacity, loaded.working_set)
    policy: str | Clairvoyant = eviction
    if eviction == Clairvoyant.name:  # knows the trace's future: a reference, not a plug-in
        policy = Clairvoyant(replay.restorable_hashes(loaded.prepared, loaded.model.block_tokens))
    res = replay.Simulator(loaded.model, admission, policy, cap, chunk_tokens,
                           in_chunk_checkpoints).run(loaded.prepared)
    return {"trace": loaded.name, "model": loaded.model.name, "admission": admission,
            "eviction": eviction, "capacity_bytes": cap, "working_set_bytes": loaded.working_set,
            **res.as_dict()}


ROWS: Sequence[tuple[str, str, str]] = (
    ("token hit rate", "token_hit_rate", "{:.1%}"),
    ("hit tokens", "hit_tokens", "{:,}"),
    ("prompt tokens", "prompt_tokens", "{:,}"),
    ("bytes written", "written_bytes", "gib"),
    ("  of which states", "state_written_bytes", "gib"),
    ("upload volume", "upload_bytes", "gib"),
    ("bytes stored per token hit", "bytes_per_hit_token", "kib"),
    ("states saved", "states_saved", "{:,}"),
    ("chunk ends moved", "chunk_ends_moved", "{:,}"),
    ("evictions", "evictions", "{:,}"),
    ("capacity", "capacity_bytes", "gib"),
    ("working set", "working_set_bytes", "gib"),
)


def fmt(value: float, how: str) -> str:
    if how == "gib":
        return f"{value / GIB:,.1f} GiB"
    if how == "kib":
        return f"{value / 1024:,.1f} KiB"
    return how.format(value)
