"""A backend wrapper for callers that must never fail: the engine's connector.

Opens lazily (the tier may be down when the engine starts), turns every error
into an *outage* the caller can tell from a miss (a lookup stopped by
``tier_unavailable``, a read answered ``None``, a put ``None``), logs it
rate-limited as "tier unavailable", counts errors by operation, and after a
failure stops calling the tier for ``retry_after_s`` so a dead tier costs one
timeout, not one per request. ``down`` says whether it is serving without the
tier right now (for a metric), until a call succeeds again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvtier.backends import Backend, open_backend
from kvtier.backends.base import PutItem
from kvtier.lookup import LookupQuery, LookupResult, StopReason

log = logging.getLogger("kvtier.connector")
T = TypeVar("T")


def _open(url: str, timeout_s: float, **options: object) -> Backend:
    """``options``: extra client options (a gRPC tier's TLS and token settings)."""
    if url.startswith("memory"):
        return open_backend(url)
    if url.startswith("grpc"):
        # Loads consume fetched bytes at once: let bulk reads reuse one buffer.
        return open_backend(url, timeout_s=timeout_s, reuse_buffer=True, **options)
    return open_backend(url, timeout_s=timeout_s)


class GuardedBackend:
    def __init__(self, url: str, timeout_s: float, retry_after_s: float,
                 opener: Callable[[], Backend] | None = None,
                 options: dict[str, object] | None = None):
        self.url = url
        self._opener = opener or (lambda: _open(url, timeout_s, **(options or {})))
        self._backend: Backend | None = None
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._last_warn = 0.0
        self._lock = threading.Lock()
        self.errors: Counter[str] = Counter()  # failed calls by operation
        self.down = False  # the last call failed: serving without the tier
        self._retired_fallbacks = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def bulk_fallbacks(self) -> int:
        """Bulk-port reads that fell back to gRPC streaming (gRPC tiers), over every connection."""
        return self._retired_fallbacks + getattr(self._backend, "bulk_fallbacks", 0)

    def _call(self, what: str, fn: Callable[[Backend], T]) -> T | None:
        """``fn``'s answer, or None when the tier is unavailable (failed, or backing off)."""
        if not self.available:
            return None
        try:
            with self._lock:
                if self._backend is None:
                    self._backend = self._opener()
                backend = self._backend
            out = fn(backend)
        except Exception as e:  # noqa: BLE001 - the engine must keep serving whatever the tier does
            self.errors[what] += 1
            self.down = True
            self.close()  # the next try, after the back-off, starts from a fresh connection
            self._down_until = time.monotonic() + self._retry_after_s
            now = time.monotonic()
            if now - self._last_warn > 10:
                self._last_warn = now
                log.warning("kvtier tier unavailable: %s on %s failed (%s); serving without "
                            "the tier for %.0fs", what, self.url, e, self._retry_after_s)
            return None
        if self.down:
            self.down = False
            log.info("kvtier tier available again on %s", self.url)
        return out

    def lookup(self, query: LookupQuery) -> LookupResult:
        """The tier's answer, or a lookup stopped by ``tier_unavailable`` (never a miss)."""
        r = self._call("lookup", lambda b: b.lookup(query))
        return r if r is not None else LookupResult(query.start_boundary,
                                                    StopReason.TIER_UNAVAILABLE)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        r = self._call("contains", lambda b: b.contains_many(keys))
        return r if r is not None else [False] * len(keys)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None] | None:
        """Payloads (None where missing), or None as a whole when the tier is unavailable."""
        return self._call("get", lambda b: b.get_many(keys))

    def read_into(self, keys: Sequence[bytes], head_bytes: int,
                  places: Sequence[Sequence[tuple[int, int]]],
                  regions: Sequence[tuple[int, int]]) -> list[memoryview | None] | None:
        """:meth:`Backend.read_into`; None when the medium cannot or the tier is unavailable
        (then :meth:`get_many` says which)."""
        return self._call("get", lambda b: b.read_into(keys, head_bytes, places, regions))

    def put_many(self, items: Sequence[PutItem]) -> int | None:
        """How many were stored, or None when the tier is unavailable."""
        return self._call("put", lambda b: b.put_many(items))

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return self._call("delete", lambda b: b.delete_many(keys)) or 0

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._retired_fallbacks += getattr(self._backend, "bulk_fallbacks", 0)
                with contextlib.suppress(Exception):
                    self._backend.close()
                self._backend = None
