"""TLS and tokens on the raw-TCP bulk port.

Each accepted connection is wrapped in TLS when the server has a certificate
(a plaintext client fails the handshake and is dropped, counted as ``tls``).
With ``--auth-token-file`` a client first sends a hello frame
(``b"KVTH" u32 len, token``); every later request is checked against that
token as it is *now* (expiry, rotation) with the same tenant rules as gRPC,
and refused with a refusal frame otherwise.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct

from kvtier.security.tokens import AuthError

log = logging.getLogger("kvtier.bulk")
HELLO_MAGIC = b"KVTH"
MAX_TOKEN = 4096
HANDSHAKE_TIMEOUT_S = 10.0


def encode_hello(token: str) -> bytes:
    raw = token.encode()
    if len(raw) > MAX_TOKEN:
        raise ValueError("bearer token longer than 4 KiB")
    return HELLO_MAGIC + struct.pack("<I", len(raw)) + raw


def accept(server: object, sock: socket.socket, peer: object) -> socket.socket | None:
    """The connection to talk over (TLS-wrapped if configured); None if the handshake failed."""
    ctx: ssl.SSLContext | None = getattr(server, "ssl_context", None)
    if ctx is None:
        return sock
    idle = sock.gettimeout()
    sock.settimeout(HANDSHAKE_TIMEOUT_S)  # a silent peer must not hold the thread forever
    try:
        tls = ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as e:
        log.warning("bulk connection from %s refused: TLS handshake failed (%s)", peer, e)
        _count(server, "tls")
        sock.close()
        return None
    tls.settimeout(idle)
    return tls


def admit(server: object, sock: socket.socket, peer: object) -> bool:
    """Whether the bulk server takes another connection (see kvtier.security.limits)."""
    limit = getattr(server, "connection_limit", None)
    if limit is None:
        return True
    if limit.admit(sock):
        server._admitted.add(id(sock))  # type: ignore[attr-defined]
        return True
    log.warning("bulk connection from %s refused: %d connections open", peer,
                limit.max_connections)
    _count(server, "connections")
    return False  # closed unanswered: the client reads over gRPC and retries later


def release(server: object, sock: socket.socket) -> None:
    admitted = getattr(server, "_admitted", None)
    if admitted is not None and id(sock) in admitted:
        admitted.discard(id(sock))
        server.connection_limit.release()  # type: ignore[attr-defined]


def _count(server: object, reason: str) -> None:
    access = getattr(server, "access", None)
    if access is not None:
        access.refuse(AuthError("unauthenticated", reason, reason))
    else:
        metrics = getattr(server, "metrics", None)
        if metrics is not None and hasattr(metrics, "refused"):
            metrics.refused(reason)


class BulkSession:
    """One connection's token; checks each request's keys (raises AuthError)."""

    def __init__(self, server: object):
        self.access = getattr(server, "access", None)
        self.token: str | None = None

    def hello(self, token: str) -> None:
        self.token = token
        if self.access is not None:
            self.access.authenticate(token)

    def check(self, keys: list[bytes]) -> None:
        if self.access is None:
            return
        p = self.access.authenticate(self.token)
        self.access.require(p, "read")
        self.access.check_keys(p, keys)
