"""Bearer tokens bound to tenants and roles (``kvtier serve --auth-token-file``).

The file is JSON, re-read on SIGHUP and whenever it changes (a bad edit keeps
the previous tokens and logs why)::

    {"tenants": {"acme": {"quota": "8GiB"}, "beta": {}},
     "tokens": [
       {"name": "acme-engines", "sha256": "<hex sha256 of the token>",
        "tenants": ["acme"], "roles": ["read", "write"], "expires": 1798761600},
       {"name": "ops", "token": "<the token itself>", "tenants": ["*"],
        "roles": ["read", "write", "admin"]}]}

``sha256`` keeps the secret out of the file; ``token`` is accepted for tests.
``expires`` is epoch seconds or an ISO-8601 time. Tenant ``*`` is every tenant.
Tokens are never logged; a token's ``name`` is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kvtier.config import parse_bytes

log = logging.getLogger("kvtier.auth")
ROLES = frozenset({"read", "write", "admin"})
ALL = "*"


class AuthError(Exception):
    """A refused request; ``code`` is ``unauthenticated`` or ``permission_denied``,
    ``reason`` the metric label (no_token, bad_token, expired, role, tenant, quota)."""

    def __init__(self, code: str, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Principal:
    name: str
    tenants: frozenset[str]
    roles: frozenset[str]
    expires: float | None = None

    @property
    def everywhere(self) -> bool:
        return ALL in self.tenants

    def require(self, role: str) -> None:
        if role not in self.roles:
            raise AuthError("permission_denied", "role",
                            f"token {self.name!r} lacks the {role} role")


@dataclass(frozen=True)
class TokenSet:
    by_digest: dict[bytes, Principal] = field(default_factory=dict)
    quotas: dict[str, int] = field(default_factory=dict)  # tenant -> bytes
    tenants: frozenset[str] = frozenset()


def _expiry(v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    raise ValueError(f"expires must be epoch seconds or ISO-8601, got {v!r}")


def parse_token_file(raw: str | bytes) -> TokenSet:
    """Validate a token file; ValueError says what is wrong (never echoing a token)."""
    d = json.loads(raw)
    if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
        raise ValueError('token file must be a JSON object with a "tokens" list')
    tenants_cfg = d.get("tenants", {})
    if not isinstance(tenants_cfg, dict):
        raise ValueError('"tenants" must map tenant names to {"quota": ...}')
    quotas = {t: parse_bytes(c["quota"]) for t, c in tenants_cfg.items()
              if isinstance(c, dict) and c.get("quota") is not None}
    by_digest: dict[bytes, Principal] = {}
    names: set[str] = set(tenants_cfg)
    for i, t in enumerate(d["tokens"]):
        where = f"tokens[{i}] ({t.get('name', '?')!r})" if isinstance(t, dict) else f"tokens[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{where} must be an object")
        if "sha256" in t:
            digest = bytes.fromhex(t["sha256"])
            if len(digest) != 32:
                raise ValueError(f"{where}: sha256 must be 64 hex digits")
        elif isinstance(t.get("token"), str) and t["token"]:
            digest = hashlib.sha256(t["token"].encode()).digest()
        else:
            raise ValueError(f"{where} needs a sha256 (or token)")
        roles = frozenset(t.get("roles", ["read"]))
        if not roles <= ROLES:
            raise ValueError(f"{where}: roles must be among {sorted(ROLES)}")
        tenants = t.get("tenants")
        if not isinstance(tenants, list) or not tenants or not all(isinstance(x, str)
                                                                  for x in tenants):
            raise ValueError(f"{where}: tenants must be a non-empty list of names")
        names.update(x for x in tenants if x != ALL)
        by_digest[digest] = Principal(str(t.get("name", f"token{i}")), frozenset(tenants),
                                      roles, _expiry(t.get("expires")))
    return TokenSet(by_digest, quotas, frozenset(names))


class TokenRegistry:
    """The current tokens; reloaded from ``path`` on :meth:`reload` or a changed file."""

    def __init__(self, path: str | Path, poll_s: float = 1.0):
        self.path = Path(path)
        self.poll_s = poll_s
        self._stamp: tuple[int, int, int] | None = None
        self.tokens = TokenSet()
        self.reloads = 0
        self.listeners: list = []  # called with the new TokenSet after each reload
        self.error = ""
        if not self.reload():
            raise ValueError(f"cannot use --auth-token-file {self.path}: {self.error}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kvtier-auth-watch", daemon=True)
        self._thread.start()

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> bool:
        """Re-read the file; on any error keep the current tokens. True if loaded."""
        try:
            stamp = self._file_stamp()
            tokens = parse_token_file(self.path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.error = str(e)
            log.error("auth token file %s not loaded (%s); keeping the previous tokens",
                      self.path, e)
            return False
        self._stamp, self.tokens = stamp, tokens
        self.reloads += 1
        log.info("auth: %d tokens for %d tenants loaded from %s", len(tokens.by_digest),
                 len(tokens.tenants), self.path)
        for fn in self.listeners:
            fn(tokens)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                changed = self._file_stamp() != self._stamp
            except OSError:
                continue
            if changed:
                self.reload()

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("unauthenticated", "no_token",
                            "no bearer token: this tier requires authentication")
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        p = None
        for d, cand in self.tokens.by_digest.items():  # constant time per entry
            if hmac.compare_digest(d, digest):
                p = cand
        if p is None:
            raise AuthError("unauthenticated", "bad_token", "invalid bearer token")
        if p.expires is not None and time.time() >= p.expires:
            raise AuthError("unauthenticated", "expired", f"token {p.name!r} has expired")
        return p

    def close(self) -> None:
        self._stop.set()


def read_token(token: str | None = None, token_file: str | None = None,
               token_env: str | None = "KVTIER_TOKEN") -> str | None:
    """A client's bearer token: given, else from a file, else from an environment variable."""
    if token:
        return token
    if token_file:
        return Path(token_file).read_text().strip() or None
    if token_env:
        return os.environ.get(token_env) or None
    return None
