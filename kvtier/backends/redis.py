"""Redis and Redis Cluster as the shared, distributed tier medium.

Keys are the encoded :class:`~kvtier.keys.BlockKey` bytes and values the opaque
payload bytes, exactly as in the memory backend, so a block stored through
one medium reads the same through another.

URLs (credentials are URL-encoded; options may also be given as keywords,
which win over the URL)::

    redis://[user:password@]host[:port][/db][?option=value&...]
    rediss://...                                   (TLS)
    redis+cluster://[user:password@]h1:p1,h2:p2[?...]    (cluster seeds)
    rediss+cluster://...                           (cluster over TLS)

Options: ``timeout_s`` (per socket operation, default 2), ``ttl_s`` (expiry of
unpinned blocks, 0/absent = none), ``ttl_tiers`` (expiry by value, :data:`TTL_TIERS`;
for ``maxmemory-policy volatile-ttl``), TLS ``ssl_ca_certs``, ``ssl_ca_path``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs``
(``required``/``optional``/``none``), ``ssl_check_hostname``; tuning
``batch_bytes``, ``socket_read_size``, ``max_connections``, ``client_name``,
``health_check_interval``, ``socket_keepalive``.

Design notes (why it looks like this):

* Every call is one round trip per node: keys are grouped per hash slot and
  node, each node gets a single non-transactional pipeline (one MGET per slot),
  and every node is sent its batch before any reply is read, so the nodes work
  concurrently without client threads. redis-py's own cluster pipeline does the
  same grouping, but costs ~2x more CPU per key (policy resolution per command);
  threads measured slower than this on a 2-core host. Standalone: one pipeline.
* The parent link of :class:`PutItem` is not stored: Redis evicts on its own
  and cannot honour it, and :meth:`Backend.lookup` verifies every key a
  boundary needs, so a parent evicted behind our back caps the hit by itself.
* Writes use ``SET NX`` (the same key means the same block, and NX keeps a
  pinned key's persistence); with a TTL, ``EXPIRE GT`` refreshes it. A key NX
  finds taken is read back and overwritten (``SET XX KEEPTTL``) only if its value
  must give way (:func:`kvtier.payload.put_verdict`: corrupt, foreign, ...):
  plain commands, so the least-privilege ACL below needs no scripting.
* The least-privilege ACL for the tier user is :data:`ACL_RULES`
  (``~kvt1:* -@all +@read +@write +@keyspace +@connection -@dangerous +info``,
  plus ``+cluster|slots +cluster|shards`` on a cluster).
* Errors never leak redis-py types: every failure is a :class:`BackendError`
  that says what to fix; a bad URL is a :class:`ValueError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ConnectionError,
    InvalidResponse,
    NoPermissionError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from kvtier.backends.base import Backend, BackendError, BackendStats, EntryInfo, PutItem
from kvtier.keys import is_state_link, namespace_prefix
from kvtier.payload import KEEP, REFUSE, REPLACE, put_verdict

_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_SSL_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_SSL_OPTS = (*_SSL_FILES, "ssl_password", "ssl_cert_reqs", "ssl_check_hostname")
# Passed through to redis-py connections as they are (after type conversion).
_CLIENT_OPTS = {
    "socket_read_size": int,
    "max_connections": int,
    "client_name": str,
    "health_check_interval": float,
    "socket_keepalive": bool,
}
_OWN_OPTS = {"timeout_s": float, "ttl_s": float, "ttl_tiers": bool, "batch_bytes": int}
KNOWN_OPTIONS = (*_OWN_OPTS, *_SSL_OPTS, *_CLIENT_OPTS)

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_BATCH_BYTES = 32 << 20  # bounds client memory and per-pipeline latency on puts
_MGET_CHUNK = 128  # keys per MGET on a standalone server (one pipeline either way)
_SCAN_COUNT = 1000
# Least privilege for the tier's ACL user: its key space, data commands, INFO for stats()
# and, on a cluster, the slot map (redis-py bootstraps with CLUSTER SLOTS).
ACL_RULES = (
    "~kvt1:* resetchannels -@all +@read +@write +@keyspace +@connection -@dangerous "
    "+info +cluster|slots +cluster|shards"
)
_Cmd = tuple[Any, ...]
_KEY_PREFIX = namespace_prefix()  # b"kvt1:" -- the only key space this backend ever touches


# -- URL ------------------------------------------------------------------------------------


@dataclass
class RedisTarget:
    """A parsed tier URL: where Redis is and how to talk to it (password never printed)."""

    tls: bool
    cluster: bool
    nodes: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    ttl_s: float | None = None
    ttl_tiers: bool = False
    batch_bytes: int = DEFAULT_BATCH_BYTES
    ssl: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        user = f"{self.username}@" if self.username else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        db = f"/{self.db}" if self.db else ""
        return f"{scheme}://{user}{hosts}{db}"


def _bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"redis option {name}={v!r} is not a boolean; use true or false")


def _number(name: str, v: Any, kind: type) -> Any:
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise ValueError(f"redis option {name}={v!r} must be a {kind.__name__}") from None


def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d*))?|([^:\[\]/]+)(?::(\d*))?", item)
    if not item or not m:
        raise ValueError(
            f"redis url {url!r}: cannot read host:port from {item!r}; "
            "write host:port, e.g. 127.0.0.1:6379 (IPv6 as [::1]:6379)"
        )
    host = m.group(1) or m.group(3)
    port_s = m.group(2) if m.group(1) else m.group(4)
    port = int(port_s) if port_s else 6379
    if not 0 < port < 65536:
        raise ValueError(f"redis url {url!r}: port {port} out of range 1-65535")
    return host, port


def parse_redis_url(url: str, **options: Any) -> RedisTarget:
    """Validate a redis tier URL plus keyword options; ValueError says what to fix."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            f"redis url {url!r} must start with one of "
            + ", ".join(f"{s}://" for s in _SCHEMES)
            + " (e.g. redis://127.0.0.1:6379/0 or redis+cluster://h1:7000,h2:7001)"
        )
    tls, cluster = _SCHEMES[scheme]
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if password is None and username is not None:
            # redis://secret@host is the legacy password-only form.
            username, password = None, username
    hosts = [h for h in hostlist.split(",")]
    if not hostlist or any(not h.strip() for h in hosts):
        raise ValueError(f"redis url {url!r} names no host; write e.g. redis://127.0.0.1:6379")
    nodes = [_host_port(h, url) for h in hosts]
    if len(nodes) > 1 and not cluster:
        raise ValueError(
            f"redis url {url!r} lists {len(nodes)} hosts; for Redis Cluster seeds use "
            f"{scheme}+cluster://h1:p1,h2:p2 (a standalone url takes one host)"
        )
    db = 0
    if path.strip("/"):
        try:
            db = int(path.strip("/"))
        except ValueError:
            raise ValueError(
                f"redis url {url!r}: path {path!r} must be a database number, e.g. /0"
            ) from None
        if db < 0:
            raise ValueError(f"redis url {url!r}: database number must be >= 0")
        if cluster and db != 0:
            raise ValueError(f"redis url {url!r}: Redis Cluster only has database 0; drop /{db}")

    opts: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == "db":
            raise ValueError(f"redis url {url!r}: give the database as a path (/{v}), not ?db=")
        opts[k] = v
    opts.update({k: v for k, v in options.items() if v is not None})
    unknown = sorted(set(opts) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown redis option(s) {', '.join(unknown)}; known: {', '.join(KNOWN_OPTIONS)}"
        )

    target = RedisTarget(tls, cluster, nodes, db, username, password)
    if "timeout_s" in opts:
        target.timeout_s = _number("timeout_s", opts["timeout_s"], float)
        if not target.timeout_s > 0:
            raise ValueError(f"redis option timeout_s must be > 0, got {target.timeout_s}")
    if "ttl_s" in opts:
        ttl = _number("ttl_s", opts["ttl_s"], float)
        if ttl < 0:
            raise ValueError(f"redis option ttl_s must be >= 0 (0 = no expiry), got {ttl}")
        target.ttl_s = ttl or None
    if "ttl_tiers" in opts:
        target.ttl_tiers = _bool("ttl_tiers", opts["ttl_tiers"])
        if target.ttl_tiers and target.ttl_s is None:
            raise ValueError("redis option ttl_tiers needs ttl_s (the expiry its tiers are "
                             "multiples of), e.g. ?ttl_s=86400&ttl_tiers=true")
    if "batch_bytes" in opts:
        target.batch_bytes = max(1, _number("batch_bytes", opts["batch_bytes"], int))
    for k, conv in _CLIENT_OPTS.items():
        if k in opts:
            target.client[k] = _bool(k, opts[k]) if conv is bool else _number(k, opts[k], conv)

    ssl_given = [k for k in _SSL_OPTS if k in opts]
    if ssl_given and not tls:
        raise ValueError(
            f"TLS option(s) {', '.join(ssl_given)} need a TLS url: use rediss:// "
            f"(or rediss+cluster://) instead of {scheme}://"
        )
    for k in _SSL_FILES:
        if k in opts:
            p = os.path.expanduser(str(opts[k]))
            if not os.path.exists(p):
                raise ValueError(f"redis option {k}: file {p!r} does not exist")
            target.ssl[k] = p
    if "ssl_password" in opts:
        target.ssl["ssl_password"] = str(opts["ssl_password"])
    if ("ssl_certfile" in target.ssl) != ("ssl_keyfile" in target.ssl):
        raise ValueError("a TLS client certificate needs both ssl_certfile and ssl_keyfile")
    if "ssl_cert_reqs" in opts:
        reqs = str(opts["ssl_cert_reqs"]).lower()
        if reqs not in _CERT_REQS:
            raise ValueError(
                f"redis option ssl_cert_reqs={opts['ssl_cert_reqs']!r}; "
                "use required, optional or none"
            )
        target.ssl["ssl_cert_reqs"] = reqs
    if "ssl_check_hostname" in opts:
        target.ssl["ssl_check_hostname"] = _bool("ssl_check_hostname", opts["ssl_check_hostname"])
    if target.ssl.get("ssl_cert_reqs") == "none":
        target.ssl.setdefault("ssl_check_hostname", False)
    return target


# -- errors ---------------------------------------------------------------------------------


def _explain(t: RedisTarget, op: str, e: BaseException) -> str:
    """One sentence on what failed and what to change, from a redis-py/OS exception."""
    # redis-py's cluster bootstrap hides the real cause (e.g. an ACL refusing CLUSTER
    # SLOTS reads "Cluster mode is not enabled"): explain the innermost telling error.
    seen, x = 0, e.__cause__ or e.__context__
    while x is not None and seen < 10:
        if isinstance(x, AuthenticationError | NoPermissionError | ssl.SSLError):
            e = x
            break
        seen, x = seen + 1, x.__cause__ or x.__context__
    msg = str(e) or type(e).__name__
    low = msg.lower()
    head = f"redis {op} at {t.where} failed: "
    who = repr(t.username or "default")
    auth_words = ("wrongpass", "username-password", "noauth", "authentication required",
                  "must be called with the client already authenticated")
    if isinstance(e, AuthenticationError) or any(w in low for w in auth_words):
        if t.password is None:
            return head + (
                f"the server requires authentication ({msg}); put the ACL user and password "
                "in the url: redis://USER:PASSWORD@host:port (URL-encoded)"
            )
        return head + (
            f"authentication failed for user {who} ({msg}); check the user and password in "
            "the url (redis://USER:PASSWORD@host:port, URL-encoded) against the server's ACL"
        )
    if isinstance(e, NoPermissionError) or "noperm" in low or "no permissions" in low:
        return head + (
            f"ACL user {who} lacks a permission ({msg}); grant it at least "
            f"'{ACL_RULES}'"
        )
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return head + (
            f"the server's TLS certificate is not trusted ({msg}); pass the CA that signed it "
            "as ssl_ca_certs=/path/ca.pem (url query or option)"
        )
    if "ssl" in low or "tls" in low or isinstance(e, ssl.SSLError):
        hint = (
            "if the server requires client certificates pass ssl_certfile= and ssl_keyfile="
            if t.tls
            else "the server may speak TLS only: use rediss://"
        )
        return head + f"TLS handshake failed ({msg}); {hint}"
    if "cluster mode is not enabled" in low or "cluster support disabled" in low:
        return head + "the server is not a cluster node; use redis:// instead of redis+cluster://"
    if low.startswith(("moved", "crossslot")) or "hash to the same slot" in low:
        return head + "the server is a Redis Cluster node; use redis+cluster://host:port,..."
    if isinstance(e, RedisTimeoutError) or "timed out" in low or "timeout" in low:
        tls_hint = (
            "; if the server does not speak TLS use redis://"
            if t.tls and "connecting" in low
            else ""
        )
        return head + (
            f"no answer within timeout_s={t.timeout_s}s ({msg}); the server is down, "
            f"overloaded or unreachable (raise timeout_s for slow links){tls_hint}"
        )
    if "cannot be connected" in low:  # no cluster seed answered
        return head + (
            f"no cluster seed answered ({msg}); are the redis-server nodes running and the "
            "host:port list in the url right?"
        )
    if isinstance(e, InvalidResponse) or "protocol error" in low:
        return head + (
            f"the peer does not speak the Redis protocol ({msg}); is host:port a Redis server"
            + (" (and does it speak TLS?)" if t.tls else " (or a TLS one needing rediss://)?")
        )
    if isinstance(e, ConnectionError | OSError):
        hint = ""
        if "refused" in low:
            hint = "; is redis-server running there and the host:port in the url right?"
        elif "closed by server" in low or "reset" in low:
            hint = (
                "; a TLS-only server drops plain connections: try rediss://" if not t.tls else ""
            )
        return head + f"cannot talk to the server ({msg}){hint}"
    if isinstance(e, OutOfMemoryError) or low.startswith("oom"):
        return head + f"server out of memory ({msg}); raise maxmemory or use a volatile-* policy"
    return head + msg


_ERRORS = (RedisError, RedisClusterException, OSError)
log = logging.getLogger(__name__)


# -- value by expiry ----------------------------------------------------------------------
# Expiry, in multiples of ttl_s, of what a key of one save is worth (``ttl_tiers``). Under
# ``maxmemory-policy volatile-ttl`` Redis evicts the key nearest its expiry first, so this
# is eviction by value as far as Redis allows (no evictor process, no parent links): a
# chain's tail after its last state first, then a state a deeper one of the same save
# supersedes, then a chain-end state, and the prefix blocks a state needs last.
TTL_TIERS = {"tail": 0.25, "mid_state": 0.5, "state": 1.0, "prefix": 2.0}


def ttl_tiers(items: Sequence[PutItem]) -> list[str]:
    """The :data:`TTL_TIERS` tier of each item of one save, from its parent links
    (:func:`kvtier.keys.is_state_link`)."""
    parent = {it.key: it.parent for it in items}
    state = [is_state_link(it.key, it.parent) for it in items]
    prefix: set[bytes] = set()
    below_deeper: set[bytes] = set()  # attention blocks with a deeper state after them
    for it, is_state in zip(items, state, strict=True):
        if not is_state:
            continue
        prefix.add(it.parent)  # type: ignore[arg-type]
        k = parent.get(it.parent)  # type: ignore[arg-type]
        while k is not None and k not in below_deeper:  # marked ones had their ancestors too
            below_deeper.add(k)
            prefix.add(k)
            k = parent.get(k)
    return [("mid_state" if it.parent in below_deeper else "state") if is_state
            else ("prefix" if it.key in prefix else "tail")
            for it, is_state in zip(items, state, strict=True)]


# -- backend --------------------------------------------------------------------------------


class RedisBackend(Backend):
    """Standalone Redis or Redis Cluster; batched, one pipeline per node per call.

    ``pin``/TTL semantics: with ``ttl_s`` set every stored block expires
    ``ttl_s`` after its last put; :meth:`pin` removes the expiry (PERSIST) and
    unpinning puts it back. Redis's own ``maxmemory`` eviction is separate: an
    ``allkeys-*`` policy may evict *any* key, pinned or not, so pins only hold
    against the TTL. For real pin semantics run Redis with a ``volatile-*``
    policy (``volatile-lru`` / ``volatile-lfu``) and a ``ttl_s``: Redis then
    evicts only keys that carry an expiry, never pinned ones. Without ``ttl_s``
    every key is persistent (and under ``volatile-*`` never evicted: writes fail
    with OOM and are counted as rejected instead).
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        timeout_s: float | None = None,
        ttl_s: float | None = None,
        **kw: Any,
    ) -> None:
        """Parse and validate only; the first call connects (so a down server is a
        BackendError on use, not a crash at start-up). ``timeout_s`` defaults to the
        url's or 2 s; ``ttl_s=0`` disables an expiry given in the url."""
        self.target = parse_redis_url(url, timeout_s=timeout_s, ttl_s=ttl_s, **kw)
        self.url = self.target.where
        self._ttl = None if self.target.ttl_s is None else max(1, round(self.target.ttl_s))
        self._lock = threading.Lock()
        self._client: redis.Redis | RedisCluster | None = None
        self._hits = self._misses = self._puts = self._rejected = self._replaced = 0

    @property
    def ttl_s(self) -> int | None:
        return self._ttl

    # -- connection ------------------------------------------------------------------------
    def _common_kwargs(self) -> dict[str, Any]:
        t = self.target
        kw: dict[str, Any] = {
            "username": t.username,
            "password": t.password,
            "socket_timeout": t.timeout_s,
            "socket_connect_timeout": t.timeout_s,
            **t.client,
        }
        if t.tls:
            kw["ssl"] = True
            kw.update(t.ssl)
        return kw

    def _connect(self) -> redis.Redis | RedisCluster:
        if not HIREDIS_AVAILABLE:
            log.warning("hiredis is not installed: redis replies parse several times slower "
                        "(pip install 'redis[hiredis]')")
        t = self.target
        kw = self._common_kwargs()
        if not t.cluster:
            host, port = t.nodes[0]
            # One immediate retry on a broken connection (e.g. after a server restart);
            # never on a timeout, so a hung server costs timeout_s, not a multiple.
            retry = Retry(NoBackoff(), 1, supported_errors=(ConnectionError,))
            return redis.Redis(host=host, port=port, db=t.db, retry=retry, **kw)
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in t.nodes],
            retry=Retry(NoBackoff(), 1),
            require_full_coverage=True,
            **kw,
        )

    def _get_client(self) -> redis.Redis | RedisCluster:
        c = self._client
        if c is not None:
            return c
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _reset(self) -> None:
        """Drop a cluster client after a connection failure: the next call re-reads topology."""
        if not self.target.cluster:
            return  # a standalone pool reconnects by itself
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            with contextlib.suppress(Exception):
                c.close()

    def _fail(self, op: str, e: BaseException) -> BackendError:
        if isinstance(e, ConnectionError | RedisTimeoutError | RedisClusterException | OSError):
            self._reset()
        return BackendError(_explain(self.target, op, e))

    def _nodes(self) -> list[redis.Redis]:
        """One client per primary (standalone: the client itself)."""
        c = self._get_client()
        if isinstance(c, RedisCluster):
            return [n.redis_connection for n in c.get_primaries()]
        return [c]

    def _by_node(self, keys: Sequence[bytes]) -> list[tuple[redis.Redis, list[int]]]:
        """Indices of ``keys`` grouped per primary node, each node's list ordered by slot."""
        c = self._get_client()
        if not isinstance(c, RedisCluster):
            return [(c, list(range(len(keys))))]
        nm = c.nodes_manager
        slots = [key_slot(k) for k in keys]
        groups: dict[str, tuple[redis.Redis, list[int]]] = {}
        for i in sorted(range(len(keys)), key=slots.__getitem__):
            node = nm.get_node_from_slot(slots[i])
            g = groups.get(node.name)
            if g is None:
                g = groups[node.name] = (node.redis_connection, [])
            g[1].append(i)
        return list(groups.values())

    @staticmethod
    def _exchange(batches: list[tuple[redis.Redis, list[_Cmd]]]) -> list[list[Any]]:
        """Send every node its whole batch, then read the replies node by node.

        One pipelined write per node; the nodes work concurrently while we read.
        No threads: measured slower here (GIL plus reply parsing serialise anyway).
        Per-command errors come back as exception objects, connection errors raise.
        """
        if len(batches) == 1:
            node, cmds = batches[0]
            pipe = node.pipeline(transaction=False)  # keeps redis-py's reconnect retry
            for c in cmds:
                pipe.execute_command(*c)
            return [pipe.execute(raise_on_error=False)]
        held: list[list[Any]] = []  # [node, connection, dirty]
        try:
            for node, cmds in batches:
                conn = node.connection_pool.get_connection()
                held.append([node, conn, True])
                conn.send_packed_command(conn.pack_commands(cmds))
            out = []
            for (node, cmds), h in zip(batches, held, strict=True):
                res: list[Any] = []
                for c in cmds:
                    try:
                        res.append(node.parse_response(h[1], c[0]))
                    except ResponseError as e:
                        res.append(e)
                h[2] = False
                out.append(res)
            return out
        finally:
            for node, conn, dirty in held:
                if dirty:  # unread replies would be read by the next user of the connection
                    conn.disconnect()
                node.connection_pool.release(conn)

    def _keyed(
        self,
        keys: Sequence[bytes],
        build: Callable[[int], list[_Cmd]],
    ) -> list[list[Any]]:
        """Run ``build(i)`` (commands on ``keys[i]``) for every key, one batch per node.

        Returns the replies per key; keys whose slot moved take the slow path.
        """
        groups = self._by_node(keys)
        plans = [[build(i) for i in idx] for _, idx in groups]
        batches = [
            (node, [c for cmds in plan for c in cmds])
            for (node, _), plan in zip(groups, plans, strict=True)
        ]
        replies = self._exchange(batches)
        out: list[list[Any]] = [[] for _ in keys]
        moved: list[int] = []
        for (_, idx), plan, rs in zip(groups, plans, replies, strict=True):
            it = iter(rs)
            for i, cmds in zip(idx, plan, strict=True):
                out[i] = [next(it) for _ in cmds]
                if any(isinstance(r, AskError | TryAgainError) for r in out[i]):
                    moved.append(i)
        if moved:
            redo = self._redirected([c for i in moved for c in build(i)])
            for i in moved:
                n = len(out[i])
                out[i], redo = redo[:n], redo[n:]
        return out

    def _redirected(self, cmds: list[_Cmd]) -> list[Any]:
        """Slow path for commands whose slot moved (resharding, failover): refresh the
        slot map for later calls and send these through redis-py's cluster client, which
        follows MOVED and ASK (with ASKING) itself."""
        c = self._get_client()
        if isinstance(c, RedisCluster):
            c.nodes_manager.initialize()
        out: list[Any] = []
        for cmd in cmds:
            try:
                out.append(c.execute_command(*cmd))
            except ResponseError as e:
                out.append(e)
        return out

    # -- reads -----------------------------------------------------------------------------
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            out = self._get_many(keys)
        except _ERRORS as e:
            raise self._fail("get", e) from e
        hits = sum(v is not None for v in out)
        with self._lock:
            self._hits += hits
            self._misses += len(out) - hits
        if hits and self._ttl is not None and self.target.ttl_tiers:
            self._refresh([k for k, v in zip(keys, out, strict=True) if v is not None])
        return out

    def _refresh(self, keys: list[bytes]) -> None:
        """A restored key proved its worth: push its expiry to the top tier (``EXPIRE GT``
        never shortens one, nor gives a pinned key an expiry). Best effort: a read that
        succeeded does not fail because its refresh did."""
        ttl = max(1, round(self._ttl * TTL_TIERS["prefix"]))  # type: ignore[operator]
        with contextlib.suppress(*_ERRORS):
            self._keyed(keys, lambda i: [("EXPIRE", keys[i], ttl, "GT")])

    def _get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """One MGET per hash slot (cluster) or per chunk (standalone); one batch per node."""
        out: list[bytes | None] = [None] * len(keys)
        groups = self._by_node(keys)
        plans: list[list[list[int]]] = []
        for _, idx in groups:
            if self.target.cluster:
                mgets: list[list[int]] = []
                last = -1
                for i in idx:  # ordered by slot
                    s = key_slot(keys[i])
                    if s != last:
                        mgets.append([])
                        last = s
                    mgets[-1].append(i)
            else:
                mgets = [idx[j : j + _MGET_CHUNK] for j in range(0, len(idx), _MGET_CHUNK)]
            plans.append(mgets)
        replies = self._exchange(
            [
                (node, [("MGET", *(keys[i] for i in m)) for m in mgets])
                for (node, _), mgets in zip(groups, plans, strict=True)
            ]
        )
        moved: list[int] = []
        for mgets, rs in zip(plans, replies, strict=True):
            for m, r in zip(mgets, rs, strict=True):
                if isinstance(r, AskError | TryAgainError):
                    moved.extend(m)
                    continue
                for i, v in zip(m, _ok(r), strict=True):
                    out[i] = v
        if moved:
            again = self._redirected([("MGET", k) for k in (keys[i] for i in moved)])
            for i, r in zip(moved, again, strict=True):
                out[i] = _ok(r)[0]
        return out

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        try:
            res = self._keyed(keys, lambda i: [("EXISTS", keys[i])])
            return [bool(_ok(r[0])) for r in res]
        except _ERRORS as e:
            raise self._fail("exists", e) from e

    def scan(self, prefix: bytes = b"", limit: int | None = None) -> Iterator[EntryInfo]:
        """Entries under ``prefix`` in Redis's SCAN order (unsorted), every primary in turn.

        Only kvtier's key space is visible: a prefix outside ``kvt1:`` selects nothing.
        """
        pattern = _match_pattern(prefix)
        if pattern is None or (limit is not None and limit <= 0):
            return
        n = 0
        try:
            for node in self._nodes():
                for batch in _scan_batches(node, pattern):
                    pipe = node.pipeline(transaction=False)
                    for k in batch:
                        pipe.execute_command("STRLEN", k)
                        pipe.execute_command("PTTL", k)
                    res = pipe.execute(raise_on_error=False)
                    for j, k in enumerate(batch):
                        size, pttl = res[2 * j], res[2 * j + 1]
                        if isinstance(size, Exception) or isinstance(pttl, Exception):
                            continue
                        if pttl == -2:  # gone since SCAN saw it
                            continue
                        pinned = self._ttl is not None and pttl == -1
                        yield EntryInfo(bytes(k), int(size), pinned, 0)
                        n += 1
                        if limit is not None and n >= limit:
                            return
        except _ERRORS as e:
            raise self._fail("scan", e) from e

    # -- writes ----------------------------------------------------------------------------
    def put_many(self, items: Sequence[PutItem]) -> int:
        """SET NX (+EX ttl) per item, one batch per node per ``batch_bytes`` chunk; then
        the keys NX found taken are read back and replaced where
        :func:`kvtier.payload.put_verdict` says so (corrupt, foreign, ...).

        The read-back costs a round trip and the old bytes, only for keys that were
        already stored (a re-save, rare: restored blocks are not saved again).
        A write Redis refuses for lack of memory counts as not stored (like the
        memory backend's rejections); any other error raises BackendError.
        """
        if not items:
            return 0
        ttl, limit = self._ttl, self.target.batch_bytes
        counts = {"stored": 0, "new": 0, "rejected": 0, "replaced": 0}
        tiers = ttl_tiers(items) if ttl is not None and self.target.ttl_tiers else None

        def build(chunk: Sequence[PutItem], at: int) -> Callable[[int], list[_Cmd]]:
            def cmds(i: int) -> list[_Cmd]:
                it = chunk[i]
                if ttl is None:
                    return [("SET", it.key, it.value, "NX")]
                t = ttl if tiers is None else max(1, round(ttl * TTL_TIERS[tiers[at + i]]))
                # EXPIRE GT refreshes an existing unpinned key and never adds a TTL to a
                # pinned (persistent) one; on Redis < 7 it errors and is ignored.
                return [("SET", it.key, it.value, "NX", "EX", t), ("EXPIRE", it.key, t, "GT")]

            return cmds

        try:
            start = 0
            while start < len(items):
                end, size = start, 0
                while end < len(items) and (end == start or size < limit):
                    size += len(items[end].value)
                    end += 1
                chunk = items[start:end]
                taken: list[PutItem] = []
                for it, rs in zip(chunk, self._keyed([it.key for it in chunk], build(chunk, start)),
                                  strict=True):
                    if _oom(rs[0]):
                        counts["rejected"] += 1
                        continue
                    counts["stored"] += 1
                    if _ok(rs[0]) is None:  # NX found the key taken
                        taken.append(it)
                    else:
                        counts["new"] += 1
                if taken:
                    self._replace_bad(taken, counts)
                start = end
        except _ERRORS as e:
            raise self._fail("put", e) from e
        finally:
            with self._lock:
                self._puts += counts["new"] + counts["replaced"]
                self._rejected += counts["rejected"]
                self._replaced += counts["replaced"]
        return counts["stored"]

    def _replace_bad(self, taken: Sequence[PutItem], counts: dict[str, int]) -> None:
        """Overwrite the taken keys whose stored value must give way (SET XX KEEPTTL:
        a pinned key stays pinned, an unpinned one keeps its expiry; a key deleted
        meanwhile stays deleted)."""
        redo: list[PutItem] = []
        for it, old in zip(taken, self._get_many([it.key for it in taken]), strict=True):
            verdict = KEEP if old is None else put_verdict(it.key, old, it.value)
            if verdict == REPLACE:
                redo.append(it)
            elif verdict == REFUSE:
                counts["rejected"] += 1
                counts["stored"] -= 1
        if not redo:
            return
        replies = self._keyed([it.key for it in redo],
                              lambda i: [("SET", redo[i].key, redo[i].value, "XX", "KEEPTTL")])
        for rs in replies:
            if _oom(rs[0]):
                counts["rejected"] += 1
                counts["stored"] -= 1
            elif _ok(rs[0]) is not None:
                counts["replaced"] += 1

    def delete_many(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        try:
            return sum(int(_ok(r[0])) for r in self._keyed(keys, lambda i: [("UNLINK", keys[i])]))
        except _ERRORS as e:
            raise self._fail("delete", e) from e

    def flush(self, prefix: bytes = b"") -> int:
        """SCAN + UNLINK on every primary; never FLUSHALL/FLUSHDB, never a foreign key."""
        pattern = _match_pattern(prefix)
        if pattern is None:
            return 0

        def flush_node(node: redis.Redis) -> int:
            n = 0
            for batch in _scan_batches(node, pattern):
                pipe = node.pipeline(transaction=False)
                for k in batch:  # one key per UNLINK: cluster keys of a batch span slots
                    pipe.execute_command("UNLINK", k)
                n += sum(r for r in pipe.execute(raise_on_error=False) if isinstance(r, int))
            return n

        try:
            return sum(flush_node(node) for node in self._nodes())
        except _ERRORS as e:
            raise self._fail("flush", e) from e

    def pin(self, keys: Sequence[bytes], pinned: bool = True) -> int:
        """PERSIST (pin) or re-apply ``ttl_s`` (unpin); returns how many keys exist.

        See the class docstring: pins hold against the TTL always, and against
        maxmemory eviction only under a ``volatile-*`` policy.
        """
        if not keys:
            return 0
        ttl = self._ttl

        def cmds(i: int) -> list[_Cmd]:
            k = keys[i]
            if pinned:
                return [("EXISTS", k), ("PERSIST", k)]
            return [("EXISTS", k)] + ([("EXPIRE", k, ttl)] if ttl is not None else [])

        try:
            return sum(int(bool(_ok(r[0]))) for r in self._keyed(keys, cmds))
        except _ERRORS as e:
            raise self._fail("pin" if pinned else "unpin", e) from e

    # -- admin -----------------------------------------------------------------------------
    def stats(self) -> BackendStats:
        """INFO memory/stats/keyspace, summed over primaries (O(1): no key scan).

        ``entries`` counts every key of the database, so give kvtier its own
        database or cluster; ``pinned`` is keys without expiry when ``ttl_s`` is set.
        """
        db = f"db{self.target.db}"

        sections = [("INFO", sec) for sec in ("memory", "stats", "keyspace", "server")]
        try:
            replies = self._exchange([(node, sections) for node in self._nodes()])
        except _ERRORS as e:
            raise self._fail("stats", e) from e
        infos: list[dict[str, Any]] = []
        for parts in replies:
            merged: dict[str, Any] = {}
            for part in parts:
                merged.update(_ok(part))
            infos.append(merged)
        keys = sum(int(i.get(db, {}).get("keys", 0)) for i in infos)
        expires = sum(int(i.get(db, {}).get("expires", 0)) for i in infos)
        maxmem = [int(i.get("maxmemory", 0)) for i in infos]
        with self._lock:
            hits, misses, puts, rejected = self._hits, self._misses, self._puts, self._rejected
            replaced = self._replaced
        return BackendStats(
            backend=self.name,
            entries=keys,
            bytes_used=sum(int(i.get("used_memory", 0)) for i in infos),
            capacity_bytes=0 if 0 in maxmem else sum(maxmem),
            hits=hits,
            misses=misses,
            puts=puts,
            evictions=sum(int(i.get("evicted_keys", 0)) for i in infos),
            pinned=keys - expires if self._ttl is not None else 0,
            extra={
                "mode": "cluster" if self.target.cluster else "standalone",
                "nodes": len(infos),
                "url": self.url,
                "rejected": rejected,
                "replaced": replaced,
                "expires": expires,
                "expired_keys": sum(int(i.get("expired_keys", 0)) for i in infos),
                "server_keyspace_hits": sum(int(i.get("keyspace_hits", 0)) for i in infos),
                "server_keyspace_misses": sum(int(i.get("keyspace_misses", 0)) for i in infos),
                "maxmemory_policy": ",".join(
                    sorted({str(i.get("maxmemory_policy", "?")) for i in infos})
                ),
                "redis_version": str(infos[0].get("redis_version", "?")),
                "ttl_s": self._ttl or 0,
                "ttl_tiers": self.target.ttl_tiers,
                "parser": "hiredis" if HIREDIS_AVAILABLE else "python",
            },
        )

    def health(self) -> dict:
        """PING every primary; raises BackendError if any does not answer."""

        try:
            nodes = self._nodes()
            t0 = time.perf_counter()
            for rs in self._exchange([(node, [("PING",)]) for node in nodes]):
                _ok(rs[0])
            latency = (time.perf_counter() - t0) * 1e3
        except _ERRORS as e:
            raise self._fail("ping", e) from e
        return {
            "ok": True,
            "backend": self.name,
            "mode": "cluster" if self.target.cluster else "standalone",
            "nodes": len(nodes),
            "latency_ms": round(latency, 3),
            "url": self.url,
        }

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            with contextlib.suppress(Exception):  # closing a broken client must not raise
                c.close()

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, ttl_s={self._ttl})"


# -- helpers --------------------------------------------------------------------------------


def _oom(r: Any) -> bool:
    """A pipelined reply that is Redis refusing a write for lack of memory."""
    return isinstance(r, OutOfMemoryError) or (
        isinstance(r, Exception) and str(r).startswith("OOM"))


def _ok(r: Any) -> Any:
    """A pipelined reply, or raise the error it carries (mapped by the caller)."""
    if isinstance(r, Exception):
        raise r
    return r


_GLOB = re.compile(rb"([*?\[\]\\])")


def _match_pattern(prefix: bytes) -> bytes | None:
    """SCAN MATCH pattern for ``prefix`` confined to kvtier's key space (None: selects nothing)."""
    if prefix.startswith(_KEY_PREFIX):
        return _GLOB.sub(rb"\\\1", prefix) + b"*"
    if _KEY_PREFIX.startswith(prefix):
        return _KEY_PREFIX + b"*"
    return None


def _scan_batches(node: redis.Redis, pattern: bytes) -> Iterator[list[bytes]]:
    cursor = 0
    while True:
        cursor, keys = node.scan(cursor, match=pattern, count=_SCAN_COUNT)
        if keys:
            yield keys
        if cursor == 0:
            return
