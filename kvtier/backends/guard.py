"""A backend wrapper for callers that must never fail: the engine's connector.

Opens lazily (the tier may be down when the engine starts), turns every error
into a miss / dropped save with a rate-limited warning, and after a failure
stops calling the tier for ``retry_after_s`` so a dead tier costs one timeout,
not one per request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvtier.backends import Backend, open_backend
from kvtier.backends.base import PutItem
from kvtier.lookup import LookupQuery, LookupResult, StopReason

log = logging.getLogger("kvtier.connector")
T = TypeVar("T")


def _open(url: str, timeout_s: float) -> Backend:
    if url.startswith("memory"):
        return open_backend(url)
    if url.startswith("grpc"):
        # Loads consume fetched bytes at once: let bulk reads reuse one buffer.
        return open_backend(url, timeout_s=timeout_s, reuse_buffer=True)
    return open_backend(url, timeout_s=timeout_s)


class GuardedBackend:
    def __init__(self, url: str, timeout_s: float, retry_after_s: float,
                 opener: Callable[[], Backend] | None = None):
        self.url = url
        self._opener = opener or (lambda: _open(url, timeout_s))
        self._backend: Backend | None = None
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._last_warn = 0.0
        self._lock = threading.Lock()
        self.errors = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, what: str, fn: Callable[[Backend], T], default: T) -> T:
        if not self.available:
            return default
        try:
            with self._lock:
                if self._backend is None:
                    self._backend = self._opener()
                backend = self._backend
            return fn(backend)
        except Exception as e:  # noqa: BLE001 - the engine must keep serving whatever the tier does
            self.errors += 1
            self.close()  # the next try, after the back-off, starts from a fresh connection
            self._down_until = time.monotonic() + self._retry_after_s
            now = time.monotonic()
            if now - self._last_warn > 10:
                self._last_warn = now
                log.warning("kvtier %s failed on %s (%s); serving without the tier for %.0fs",
                            what, self.url, e, self._retry_after_s)
            return default

    def lookup(self, query: LookupQuery) -> LookupResult:
        return self._call("lookup", lambda b: b.lookup(query),
                          LookupResult(query.start_boundary, StopReason.NOTHING_TO_LOOK_UP))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._call("get", lambda b: b.get_many(keys), [None] * len(keys))

    def put_many(self, items: Sequence[PutItem]) -> int:
        return self._call("put", lambda b: b.put_many(items), 0)

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return self._call("delete", lambda b: b.delete_many(keys), 0)

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                with contextlib.suppress(Exception):
                    self._backend.close()
                self._backend = None
