"""Backend factory: a tier URL picks the medium.

- ``memory://`` (optionally ``?capacity=4GiB&eviction=value``): in-process store;
- ``grpc://host:port``: a ``kvtier serve`` tier server (``grpcs://``: over TLS; CA, client
  certificate and bearer token as options or ``KVTIER_TLS_*`` / ``KVTIER_TOKEN[_FILE]``);
- ``redis://`` / ``rediss://``: standalone Redis (ACL user/password and TLS in the URL);
- ``redis+cluster://host:port,host:port`` (or ``rediss+cluster://``): Redis Cluster seeds.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kvtier.backends.base import Backend, BackendError, BackendStats, EntryInfo, PutItem
from kvtier.config import check_tier_url, parse_bytes

_EMBEDDED: dict[str, Backend] = {}
_EMBEDDED_LOCK = threading.Lock()

__all__ = ["Backend", "BackendError", "BackendStats", "EntryInfo", "PutItem", "open_backend"]


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend that ``url`` names; ``options`` go to its constructor."""
    check_tier_url(url)
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        # One store per URL per process: an engine's scheduler and worker (same
        # process) share it, which is what "embedded" means.
        with _EMBEDDED_LOCK:
            if url not in _EMBEDDED:
                from kvtier.backends.memory import MemoryBackend

                q = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
                capacity = parse_bytes(q.get("capacity", options.pop("capacity", 1 << 30)))
                policy = q.get("eviction", options.pop("eviction", "value"))
                _EMBEDDED[url] = MemoryBackend(capacity, policy=policy)
            return _EMBEDDED[url]
    if scheme in ("grpc", "grpcs"):
        from kvtier.backends.grpc import GrpcBackend

        return GrpcBackend(url, **options)
    from kvtier.backends.redis import RedisBackend

    return RedisBackend(url, **options)
