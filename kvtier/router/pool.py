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
import socket
from dataclasses import dataclass, field

import httpx
import xxhash

log = logging.getLogger("kvtier.router")
DNS = "dns+"


class NoBackend(Exception):
    """No backend of a kind is up."""

    def __init__(self, kind: str, backends: list[Backend], sources: str = ""):
        self.kind, self.backends = kind, backends
        detail = "; ".join(f"{b.url}: {b.last_error or 'down'}" for b in backends)
        super().__init__(f"no {kind} backend is up ({detail or 'none found at ' + sources})")


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
        """``urls``: ``http(s)://host:port`` backends, or ``dns+http://name:port`` for every
        address ``name`` resolves to, re-resolved at each health round (a Kubernetes
        headless Service lists one address per ready pod)."""
        if not urls:
            raise ValueError(f"at least one {kind} URL is needed")
        for u in urls:
            if not u.removeprefix(DNS).startswith(("http://", "https://")):
                raise ValueError(f"{kind} URL {u!r} must start with http://, https:// or "
                                 f"{DNS}http(s)://")
        self.kind, self.health_timeout_s = kind, health_timeout_s
        self.affinity_slack = affinity_slack
        self._timeout = timeout
        urls = [u.rstrip("/") for u in dict.fromkeys(urls)]
        self._static = [u for u in urls if not u.startswith(DNS)]
        self._dns = [httpx.URL(u.removeprefix(DNS)) for u in urls if u.startswith(DNS)]
        self.backends = [self._backend(u) for u in self._static]
        self._retired: list[Backend] = []
        self._ties = itertools.count()

    def _backend(self, url: str) -> Backend:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        return Backend(url, self.kind, httpx.AsyncClient(base_url=url, timeout=self._timeout,
                                                         limits=limits))

    async def discover(self) -> None:
        """Re-resolve ``dns+`` sources: new addresses join (up after their first health
        check), vanished ones leave (their client closes once nothing is in flight)."""
        if not self._dns:
            return
        found = list(self._static)
        loop = asyncio.get_running_loop()
        for src in self._dns:
            port = src.port or (443 if src.scheme == "https" else 80)
            try:
                infos = await loop.getaddrinfo(src.host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                log.warning("%s: cannot resolve %s (%s); keeping the last backends",
                            self.kind, src.host, e)
                return
            for family, *_, addr in infos:
                host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
                found.append(f"{src.scheme}://{host}:{addr[1]}")
        known = {b.url: b for b in self.backends}
        self.backends = [known.get(u) or self._backend(u) for u in dict.fromkeys(found)]
        for b in set(known.values()) - set(self.backends):
            log.info("%s backend %s left DNS", self.kind, b.url)
            self._retired.append(b)
        done = [b for b in self._retired if b.outstanding == 0]
        self._retired = [b for b in self._retired if b.outstanding]
        await asyncio.gather(*(b.client.aclose() for b in done))

    def describe_sources(self) -> str:
        return ", ".join([*self._static, *(f"{DNS}{u}" for u in self._dns)])

    def require(self) -> None:
        """Raise :class:`NoBackend` unless some backend is up."""
        if not any(b.up for b in self.backends):
            raise NoBackend(self.kind, self.backends, self.describe_sources())

    def pick(self, affinity_key: str | None = None,
             exclude: frozenset[Backend] = frozenset()) -> Backend:
        """The backend for the next request; raises :class:`NoBackend` if none is up."""
        live = [b for b in self.backends if b.up and b not in exclude]
        if not live:
            raise NoBackend(self.kind, self.backends, self.describe_sources())
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
        await self.discover()
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def aclose(self) -> None:
        await asyncio.gather(*(b.client.aclose() for b in self.backends + self._retired))
