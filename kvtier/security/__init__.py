"""Authentication, TLS and tenant isolation for the tier server's ports and its clients.

- :mod:`kvtier.security.tls`: certificates for gRPC and the bulk socket (optional mTLS);
- :mod:`kvtier.security.tokens`: the bearer-token file (tenants, roles, expiry, quotas);
- :mod:`kvtier.security.access`: namespace ownership, role and quota checks;
- :mod:`kvtier.security.grpc_auth`: the server and client gRPC interceptors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from kvtier.security.tls import ClientTLS, ServerTLS

__all__ = ["ClientTLS", "ServerSecurity", "ServerTLS", "client_channel", "server_security"]


@dataclass
class ServerSecurity:
    tls: ServerTLS | None = None
    access: Any = None  # kvtier.security.access.Access when --auth-token-file is set
    config: Any = None
    metrics: Any = None

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        out: list[grpc.ServerInterceptor] = []
        idle = getattr(self.config, "stream_idle_s", 0)
        if idle:
            from kvtier.security.limits import StreamWatchdog

            out.append(StreamWatchdog(idle, getattr(self.metrics, "refused", None)))
        if self.access is not None:
            from kvtier.security.grpc_auth import AuthInterceptor

            out.append(AuthInterceptor(self.access))
        return out

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Bind gRPC (TLS when configured); the bound port, 0 if it could not be bound."""
        try:
            if self.tls is not None:
                return server.add_secure_port(address, self.tls.grpc_credentials())
            return server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
            return 0

    def attach_bulk(self, bulk: Any) -> None:
        """The bulk server wraps each connection in TLS and asks for a token in its hello."""
        bulk.ssl_context = self.tls.ssl_context() if self.tls is not None else None
        bulk.access = self.access
        if self.config is not None:
            from kvtier.security.limits import ConnectionLimit

            bulk.connection_limit = ConnectionLimit(self.config.bulk_max_connections,
                                                    self.config.bulk_idle_s)

    def reload(self) -> None:
        if self.access is not None:
            self.access.registry.reload()


def server_security(config: Any, backend: Any, metrics: Any = None) -> ServerSecurity:
    """TLS and token checks from a :class:`kvtier.config.ServerConfig` (either may be off)."""
    tls = ServerTLS(config.tls_cert, config.tls_key, config.tls_client_ca) \
        if config.tls_cert else None
    access = None
    if config.auth_token_file:
        from kvtier.config import ConfigError
        from kvtier.security.access import Access
        from kvtier.security.tokens import TokenRegistry

        try:
            registry = TokenRegistry(config.auth_token_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        access = Access(registry, backend, metrics)
    return ServerSecurity(tls, access, config, metrics)


def client_channel(target: str, options: list, tls: ClientTLS | None = None,
                   token: str | None = None) -> grpc.Channel:
    """A channel to the tier: TLS if ``tls``, every call carrying the bearer ``token``."""
    if tls is not None:
        channel = grpc.secure_channel(target, tls.grpc_credentials(),
                                      options=[*options, *tls.grpc_options()])
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        from kvtier.security.grpc_auth import BearerAuth

        channel = grpc.intercept_channel(channel, BearerAuth(token))
    return channel


@dataclass(frozen=True)
class ClientSecurity:
    """A tier client's TLS settings and bearer token (``__repr__`` never shows the token)."""

    tls: ClientTLS | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return f"ClientSecurity(tls={self.tls!r}, token={'<set>' if self.token else None})"

    @classmethod
    def from_options(cls, url: str, tls_ca: str | None = None, tls_cert: str | None = None,
                     tls_key: str | None = None, tls_server_name: str | None = None,
                     token: str | None = None, token_file: str | None = None,
                     token_env: str | None = "KVTIER_TOKEN") -> ClientSecurity:
        """``grpcs://`` turns TLS on; unset options fall back to ``KVTIER_TLS_CA``,
        ``KVTIER_TLS_CERT``, ``KVTIER_TLS_KEY``, ``KVTIER_TOKEN_FILE`` and ``$token_env``."""
        import os

        from kvtier.security.tokens import read_token

        env = os.environ.get
        tls = None
        if url.startswith("grpcs://"):
            tls = ClientTLS(tls_ca or env("KVTIER_TLS_CA"), tls_cert or env("KVTIER_TLS_CERT"),
                            tls_key or env("KVTIER_TLS_KEY"), tls_server_name)
        tok = read_token(token, token_file or env("KVTIER_TOKEN_FILE"), token_env)
        return cls(tls, tok)

    def channel(self, target: str, options: list) -> grpc.Channel:
        return client_channel(target, options, self.tls, self.token)

    def wrap_bulk(self, sock: Any, host: str) -> Any:
        """TLS around a fresh bulk connection, then the hello frame with the token."""
        if self.tls is not None:
            sock = self.tls.ssl_context().wrap_socket(
                sock, server_hostname=self.tls.server_name or host)
        if self.token:
            from kvtier.security.bulk_auth import encode_hello

            sock.sendall(encode_hello(self.token))
        return sock
