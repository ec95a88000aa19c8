"""Who may touch which keys: tenants own namespaces, roles gate operations, quotas cap bytes.

A namespace id is ``sha256(model, layout, tenant salt)[:16]`` (:class:`kvtier.keys.Namespace`),
so the server can *verify* that a namespace belongs to a tenant: a client that
writes a namespace's manifest (model + layout) proves it when one of its
token's tenants, used as the salt, gives that id. That claim is the only way a
namespace gets an owner, and it is rebuilt from the stored manifests at start
and on every token reload, so nothing else needs persisting. A connector
therefore uses its auth tenant as its ``tenant`` option. A key whose namespace
is not owned by one of the caller's tenants is refused, whoever else owns it.

Roles: ``read`` (lookup, get, contains, scan, stats), ``write`` (put, delete:
the loader deletes corrupt blocks it tried), ``admin`` (flush, pin). Tenant
``*`` reaches every namespace. Per-tenant quotas: a put that would take a
tenant past its quota first evicts that tenant's own unpinned leaves, never
anyone else's entries, and is refused if that is not enough.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

from kvtier.backends.base import Backend, PutItem
from kvtier.keys import KEY_PREFIX, Namespace, is_manifest_key, namespace_of, namespace_prefix
from kvtier.manifest import NamespaceManifest
from kvtier.security.tokens import AuthError, Principal, TokenRegistry, TokenSet

log = logging.getLogger("kvtier.auth")
_USAGE_TTL_S = 1.0


class Access:
    """Server-side checks shared by the gRPC interceptor and the bulk port."""

    def __init__(self, registry: TokenRegistry, backend: Backend, metrics: object | None = None):
        self.registry, self.backend, self.metrics = registry, backend, metrics
        self.owners: dict[bytes, str] = {}
        self._usage: dict[str, tuple[float, int]] = {}  # tenant -> (when, bytes)
        self._lock = threading.Lock()
        self.refused: dict[str, int] = {}
        registry.listeners.append(lambda _tokens: self.rebuild())
        self.rebuild()

    # -- bookkeeping ---------------------------------------------------------------------
    def refuse(self, e: AuthError) -> AuthError:
        with self._lock:
            self.refused[e.reason] = self.refused.get(e.reason, 0) + 1
        if self.metrics is not None and hasattr(self.metrics, "refused"):
            self.metrics.refused(e.reason)
        return e

    def rebuild(self) -> None:
        """Owners of every stored namespace, proved again from its manifest."""
        tenants = self.registry.tokens.tenants
        owners: dict[bytes, str] = {}
        keys = [e.key for e in self.backend.scan(KEY_PREFIX + b":") if is_manifest_key(e.key)]
        for k, v in zip(keys, self.backend.get_many(keys)):
            ns = namespace_of(k)
            owner = self._prove(ns, v, tenants) if ns is not None and v is not None else None
            if owner is not None:
                owners[ns] = owner
        with self._lock:
            self.owners = owners
            self._usage.clear()
        log.info("auth: %d namespaces owned by %d tenants", len(owners), len(set(owners.values())))

    @staticmethod
    def _prove(ns: bytes, manifest: bytes | memoryview, tenants: Iterable[str]) -> str | None:
        try:
            m = NamespaceManifest.from_bytes(manifest)
        except ValueError:
            return None
        for t in tenants:
            if Namespace(m.model, m.layout, t).id == ns:
                return t
        return None

    # -- checks --------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Principal:
        try:
            return self.registry.authenticate(token)
        except AuthError as e:
            raise self.refuse(e) from None

    def require(self, p: Principal, role: str) -> None:
        try:
            p.require(role)
        except AuthError as e:
            raise self.refuse(e) from None

    def check_namespace(self, p: Principal, ns: bytes) -> None:
        if p.everywhere or self.owners.get(ns) in p.tenants:
            return
        raise self.refuse(AuthError(
            "permission_denied", "tenant",
            f"namespace {ns.hex()} is not one of token {p.name!r}'s tenants' namespaces (a "
            "namespace is owned once its manifest was written under the tenant's salt: set the "
            "connector's tenant option to the auth tenant)"))

    def check_keys(self, p: Principal, keys: Sequence[bytes]) -> None:
        if p.everywhere:
            return
        seen: set[bytes] = set()
        for k in keys:
            ns = namespace_of(k)
            if ns is None:
                continue  # not a kvtier key: the server's validation refuses it
            if ns not in seen:
                self.check_namespace(p, ns)
                seen.add(ns)

    def check_put(self, p: Principal, items: Sequence[PutItem]) -> None:
        """Manifests claim their namespace; every other key must be the caller's; quotas."""
        for it in items:
            if is_manifest_key(it.key):
                self._claim(p, it)
        self.check_keys(p, [it.key for it in items])
        self.check_keys(p, [it.parent for it in items if it.parent])
        self._charge(items)

    def _claim(self, p: Principal, it: PutItem) -> None:
        ns = namespace_of(it.key)
        if ns is None:
            return
        tenants = self.registry.tokens.tenants if p.everywhere else p.tenants
        owner = self._prove(ns, it.value, tenants)
        with self._lock:
            current = self.owners.get(ns)
            if owner is not None and current in (None, owner):
                self.owners[ns] = owner
                return
        if p.everywhere:
            return
        raise self.refuse(AuthError(
            "permission_denied", "tenant",
            f"manifest of namespace {ns.hex()} is not derived from token {p.name!r}'s tenants "
            f"({', '.join(sorted(p.tenants))}): use the auth tenant as the connector's tenant"))

    def filter_entries(self, p: Principal, keys: Iterable[bytes]) -> list[bool]:
        """Which of ``keys`` the caller may see (for scans)."""
        if p.everywhere:
            return [True for _ in keys]
        return [self.owners.get(namespace_of(k) or b"") in p.tenants for k in keys]

    def namespaces_of(self, p: Principal) -> list[bytes]:
        return [ns for ns, t in self.owners.items() if p.everywhere or t in p.tenants]

    # -- quotas --------------------------------------------------------------------------
    def _tenant_entries(self, tenant: str) -> list:
        out = []
        for ns in [n for n, t in self.owners.items() if t == tenant]:
            out.extend(self.backend.scan(namespace_prefix(ns)))
        return out

    def usage(self, tenant: str) -> int:
        with self._lock:
            cached = self._usage.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < _USAGE_TTL_S:
            return cached[1]
        used = sum(e.size for e in self._tenant_entries(tenant))
        with self._lock:
            self._usage[tenant] = (time.monotonic(), used)
        return used

    def _charge(self, items: Sequence[PutItem]) -> None:
        quotas = self.registry.tokens.quotas
        if not quotas:
            return
        incoming: dict[str, int] = {}
        for it in items:
            owner = self.owners.get(namespace_of(it.key) or b"")
            if owner in quotas:
                incoming[owner] = incoming.get(owner, 0) + len(it.value)
        for tenant, nbytes in incoming.items():
            quota = quotas[tenant]
            if nbytes > quota:
                raise self.refuse(AuthError("resource_exhausted", "quota",
                                            f"put of {nbytes} bytes exceeds tenant {tenant!r}'s "
                                            f"quota of {quota} bytes"))
            used = self.usage(tenant)
            if used + nbytes > quota:
                used = self._evict_own(tenant, used + nbytes - quota)
            with self._lock:
                self._usage[tenant] = (self._usage.get(tenant, (time.monotonic(), 0))[0],
                                       used + nbytes)

    def _evict_own(self, tenant: str, need: int) -> int:
        """Drop the tenant's own unpinned leaves until ``need`` bytes are free; new usage."""
        victims, freed = [], 0
        for e in self._tenant_entries(tenant):
            if freed >= need:
                break
            if not e.pinned and e.children == 0 and not is_manifest_key(e.key):
                victims.append(e.key)
                freed += e.size
        if freed < need:
            raise self.refuse(AuthError(
                "resource_exhausted", "quota",
                f"tenant {tenant!r} is at its quota of {self.registry.tokens.quotas[tenant]} "
                "bytes and holds nothing evictable (pinned or parents)"))
        self.backend.delete_many(victims)
        with self._lock:
            self._usage.pop(tenant, None)
        return self.usage(tenant)


def tokens_summary(t: TokenSet) -> dict:
    """What may be logged about a token set: names, tenants, roles; never a token."""
    return {p.name: {"tenants": sorted(p.tenants), "roles": sorted(p.roles)}
            for p in t.by_digest.values()}
