"""A namespace's manifest: what its blocks mean, stored once beside them.

Keys are opaque hashes; admin tools (``kvtier ls``, ``explain``) need to know
which model a namespace belongs to, its groups and their kinds, and the block
sizes, to turn a prompt into keys. Each engine's connector writes it at start-up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvtier.lookup import GroupKind, GroupQuery


@dataclass(frozen=True)
class GroupInfo:
    group_id: int
    kind: str  # GroupKind value
    block_size: int
    layers: int = 1


@dataclass(frozen=True)
class NamespaceManifest:
    namespace: str  # hex
    model: str
    layout: str  # fingerprint
    groups: list[GroupInfo] = field(default_factory=list)
    boundary_tokens: int = 0  # scheduler block size
    hash_block_size: int = 0
    hash_algo: str = "sha256"
    tp_size: int = 1
    tenant_salted: bool = False
    # How the engines seed vLLM's prefix hash (see kvtier.hashing.HashSeed): source
    # (PYTHONHASHSEED / default / random), the seed where recording it is harmless,
    # a digest of NONE_HASH, and the layout fingerprint without the seed. Empty in
    # manifests written before kvtier recorded them.
    hash_seed_source: str = ""
    hash_seed: str | None = None
    hash_seed_digest: str = ""
    layout_unseeded: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> NamespaceManifest:
        try:
            d = json.loads(bytes(raw))
            d["groups"] = [GroupInfo(**g) for g in d.get("groups", [])]
            known = {f.name for f in fields(cls)}  # fields of a newer kvtier are ignored
            return cls(**{k: v for k, v in d.items() if k in known})
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a kvtier namespace manifest: {e}") from None

    def group_queries(self) -> list[GroupQuery]:
        return [GroupQuery(g.group_id, GroupKind(g.kind), g.block_size // self.hash_block_size)
                for g in self.groups]


def load_manifests(backend: Any) -> dict[str, NamespaceManifest]:
    """Every readable namespace manifest a backend holds, by namespace hex.

    A damaged manifest is skipped (its namespace then shows as model "?" in ``ls``).
    """
    from kvtier.keys import is_manifest_key

    keys = [e.key for e in backend.scan(b"kvt1:") if is_manifest_key(e.key)]
    found: dict[str, NamespaceManifest] = {}
    for v in backend.get_many(keys):
        if v is not None:
            try:
                m = NamespaceManifest.from_bytes(bytes(v))
            except ValueError:
                continue
            found[m.namespace] = m
    return found
