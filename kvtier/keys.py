"""Keys: what a stored block *means*.

A block is addressed by (namespace, TP rank, KV-cache group, block hash). The
namespace folds in the model identity and a fingerprint of the cache layout
(dtypes, shapes, block sizes, group structure, TP size) plus an optional
tenant salt, so bytes stored under one layout can never be looked up under
another: a different layout is simply a different key space.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

KEY_PREFIX = b"kvt1"
NAMESPACE_BYTES = 16


def fingerprint(obj: Any) -> str:
    """Stable hex digest of a JSON-serialisable description."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Namespace:
    """Model identity + layout fingerprint + tenant salt, hashed to 16 bytes."""

    model: str
    layout: str
    tenant: str = ""

    @property
    def id(self) -> bytes:
        h = hashlib.sha256(f"{self.model}\0{self.layout}\0{self.tenant}".encode())
        return h.digest()[:NAMESPACE_BYTES]

    @property
    def hex(self) -> str:
        return self.id.hex()


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Address of one stored block (one group's page at one block hash)."""

    namespace: bytes
    rank: int
    group: int
    block_hash: bytes

    def encode(self) -> bytes:
        """Byte key used by every backend: ``kvt1:<ns>:<rank>:<group>:<hash>`` (hex)."""
        return b":".join(
            (
                KEY_PREFIX,
                self.namespace.hex().encode(),
                str(self.rank).encode(),
                str(self.group).encode(),
                self.block_hash.hex().encode(),
            )
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> BlockKey:
        if isinstance(raw, str):
            raw = raw.encode()
        parts = raw.split(b":")
        if len(parts) != 5 or parts[0] != KEY_PREFIX:
            raise ValueError(f"not a kvtier block key: {raw[:80]!r}")
        if len(parts[1]) != 2 * NAMESPACE_BYTES:
            raise ValueError(f"malformed kvtier block key {raw[:80]!r}: namespace must be "
                             f"{2 * NAMESPACE_BYTES} hex digits")
        try:
            return cls(
                namespace=bytes.fromhex(parts[1].decode()),
                rank=int(parts[2]),
                group=int(parts[3]),
                block_hash=bytes.fromhex(parts[4].decode()),
            )
        except ValueError as e:
            raise ValueError(f"malformed kvtier block key {raw[:80]!r}: {e}") from None


# What BlockKey.encode produces, and nothing else: servers check every key of every
# call, and decoding each (fromhex, int) cost twice as much.
_CANONICAL = re.compile(
    rb"%s:[0-9a-f]{%d}:-?[0-9]+:-?[0-9]+:(?:[0-9a-f]{2})*" % (KEY_PREFIX, 2 * NAMESPACE_BYTES))


def is_block_key(raw: bytes) -> bool:
    """Whether ``raw`` is a block key exactly as :meth:`BlockKey.encode` writes one."""
    return _CANONICAL.fullmatch(raw) is not None


def group_of(key: bytes) -> bytes | None:
    """The KV-cache group field of a block key, unparsed (None for other keys): enough to
    tell a recurrent state from the attention block it sits on (their groups differ)."""
    parts = key.split(b":")
    return parts[3] if len(parts) == 5 else None


def is_state_link(key: bytes, parent: bytes | None) -> bool:
    """Whether a put of ``key`` with writer-declared ``parent`` is a recurrent state: states
    hang off the attention block at their boundary (another group), attention blocks off
    the previous block of their own group."""
    return parent is not None and group_of(parent) != group_of(key)


def namespace_prefix(namespace: bytes | None = None) -> bytes:
    """Key prefix selecting every block (of one namespace, if given)."""
    if namespace is None:
        return KEY_PREFIX + b":"
    return KEY_PREFIX + b":" + namespace.hex().encode() + b":"


def namespace_of(key: bytes) -> bytes | None:
    """The namespace a kvtier key (block or manifest) lives in; None for anything else."""
    parts = key.split(b":", 2)
    if len(parts) < 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 2 * NAMESPACE_BYTES:
        return None
    try:
        return bytes.fromhex(parts[1].decode())
    except ValueError:
        return None


MANIFEST_SUFFIX = b":manifest"


def manifest_key(namespace: bytes) -> bytes:
    """Where a namespace's manifest (model, groups, block sizes) is kept, beside its blocks
    (inside kvtier's key space, so Redis ACLs limited to ``kvt1:*`` cover it)."""
    return namespace_prefix(namespace)[:-1] + MANIFEST_SUFFIX


def is_manifest_key(raw: bytes) -> bool:
    return raw.startswith(KEY_PREFIX + b":") and raw.endswith(MANIFEST_SUFFIX)
