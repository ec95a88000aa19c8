"""Backends of one kind (prefill or decode): health, load, and which one to use next.

Selection is least-outstanding-requests among the backends that passed their last
health check. Prefill can also follow prefix affinity: rendezvous (highest random
weight) hashing of the prompt's first characters names a preferred backend, so a
shared prefix keeps landing where it is already in the local prefix cache, and when
a backend goes away only its own prefixes move. Affinity yields to load: the
preferred backend is used only while it has at most ``affinity_slack`` more
requests in flight than the least loaded one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import httpx
import xxhash

log = logging.getLogger("kvtier.router")


class NoBackend(Exception):
    """No backend of a kind is up."""

    def __init__(self, kind: str, backends: list[Backend]):
        self.kind, self.backends = kind, backends
        detail = "; ".join(f"{b.url}: {b.last_error or 'down'}" for b in backends)
        super().__init__(f"no {kind} backend is up ({detail})")


@dataclass(eq=False)
class Backend:
    """One vLLM API server, e.g. ``http://10.0.0.5:8000``."""

    url: str
    kind: str
    client: httpx.AsyncClient
    up: bool = False
    outstanding: int = 0
    last_error: str | None = "not checked yet"
    _hash_seed: int = field(init=False)

    def __post_init__(self) -> None:
        self._hash_seed = xxhash.xxh64_intdigest(self.url.encode())

    def weight(self, key: str) -> int:
        return xxhash.xxh64_intdigest(key.encode(), seed=self._hash_seed)

    def mark_down(self, error: str) -> None:
        if self.up:
            log.warning("%s backend %s is down: %s", self.kind, self.url, error)
        self.up, self.last_error = False, error


class Pool:
    """The backends of one kind, with periodic ``/health`` checks."""

    def __init__(self, kind: str, urls: list[str], timeout: httpx.Timeout,
                 health_timeout_s: float = 2.0, affinity_slack: int = 2):
        if not urls:
            raise ValueError(f"at least one {kind} URL is needed")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"{kind} URL {u!r} must start with http:// or https://")
        self.kind, self.health_timeout_s = kind, health_timeout_s
        self.affinity_slack = affinity_slack
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.backends = [
            Backend(u.rstrip("/"), kind, httpx.AsyncClient(base_url=u.rstrip("/"),
                                                           timeout=timeout, limits=limits))
            for u in dict.fromkeys(urls)]
        self._ties = itertools.count()

    def require(self) -> None:
        """Raise :class:`NoBackend` unless some backend is up."""
        if not any(b.up for b in self.backends):
            raise NoBackend(self.kind, self.backends)

    def pick(self, affinity_key: str | None = None,
             exclude: frozenset[Backend] = frozenset()) -> Backend:
        """The backend for the next request; raises :class:`NoBackend` if none is up."""
        live = [b for b in self.backends if b.up and b not in exclude]
        if not live:
            raise NoBackend(self.kind, self.backends)
        least = min(b.outstanding for b in live)
        if affinity_key is not None:
            preferred = max(live, key=lambda b: b.weight(affinity_key))
            if preferred.outstanding <= least + self.affinity_slack:
                return preferred
        idle = [b for b in live if b.outstanding == least]
        return idle[next(self._ties) % len(idle)]  # rotate among equals

    async def check(self, backend: Backend) -> None:
        try:
            r = await backend.client.get("/health", timeout=self.health_timeout_s)
        except httpx.HTTPError as e:
            backend.mark_down(f"health check failed: {type(e).__name__}: {e}".rstrip(": "))
            return
        if r.status_code == 200:
            if not backend.up:
                log.info("%s backend %s is up", self.kind, backend.url)
            backend.up, backend.last_error = True, None
        else:
            backend.mark_down(f"health check answered {r.status_code}")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def aclose(self) -> None:
        await asyncio.gather(*(b.client.aclose() for b in self.backends))
