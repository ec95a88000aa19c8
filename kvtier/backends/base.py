"""The one client surface every tier medium implements.

A backend stores opaque payloads (see :mod:`kvtier.payload`) under encoded
:class:`~kvtier.keys.BlockKey` bytes. The in-process memory store, a remote
tier server (gRPC) and Redis all look the same to the connector and the CLI;
only :meth:`Backend.lookup` may be answered remotely in one round trip.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from kvtier.keys import BlockKey, is_manifest_key
from kvtier.lookup import LookupQuery, LookupResult, deepest_restorable


class BackendError(RuntimeError):
    """The medium could not be reached or answered wrongly (a miss, never a crash)."""


@dataclass(frozen=True, slots=True)
class PutItem:
    key: bytes
    value: bytes
    # The key this block extends (previous attention block, or the attention
    # block a state sits on); eviction never drops a parent before its children.
    parent: bytes | None = None


@dataclass
class BackendStats:
    backend: str
    entries: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    pinned: int = 0
    extra: dict[str, float | int | str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    key: bytes
    size: int
    pinned: bool = False
    children: int = 0


class Backend(ABC):
    """Abstract tier medium. Methods are batched: one call per request, not per block."""

    name: str = "abstract"

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Payloads for ``keys`` (None where missing), in order."""

    @abstractmethod
    def put_many(self, items: Sequence[PutItem]) -> int:
        """Store items (parents first); return how many were stored."""

    @abstractmethod
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    @abstractmethod
    def delete_many(self, keys: Sequence[bytes]) -> int: ...

    @abstractmethod
    def scan(self, prefix: bytes = b"", limit: int | None = None) -> Iterator[EntryInfo]: ...

    @abstractmethod
    def stats(self) -> BackendStats: ...

    def read_into(self, keys: Sequence[bytes], head_bytes: int,
                  places: Sequence[Sequence[tuple[int, int]]],
                  regions: Sequence[tuple[int, int]]) -> list[memoryview | None] | None:
        """Read each payload's first ``head_bytes`` (returned) and place the rest straight
        into ``places[i]``, (address, length) runs inside ``regions`` of this process's
        memory, in order: no staging copy. None where missing or not the size the places
        add up to. Returns None when this medium cannot (then read with :meth:`get_many`).
        Nothing placed is validated: the caller checks each payload (header + checksum)."""
        return None

    def lookup(self, query: LookupQuery, with_details: bool = False) -> LookupResult:
        return deepest_restorable(query, self.contains_many, with_details)

    def scan_blocks(self, prefix: bytes = b"kvt1:") -> Iterator[tuple[BlockKey, EntryInfo]]:
        """Stored blocks under ``prefix``, decoded (manifests and foreign keys skipped)."""
        for e in self.scan(prefix):
            if is_manifest_key(e.key):
                continue
            try:
                yield BlockKey.decode(e.key), e
            except ValueError:
                continue

    def pin(self, keys: Sequence[bytes], pinned: bool = True) -> int:
        """Exempt keys from eviction (or release them); returns how many exist."""
        raise BackendError(f"{self.name} backend does not support pinning")

    def flush(self, prefix: bytes = b"") -> int:
        """Drop every entry under ``prefix``; returns how many."""
        keys = [e.key for e in self.scan(prefix)]
        return self.delete_many(keys)

    def health(self) -> dict:
        """Cheap liveness probe; raises BackendError when unhealthy."""
        s = self.stats()
        return {"ok": True, "backend": s.backend, "entries": s.entries}

    def close(self) -> None:
        return None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
