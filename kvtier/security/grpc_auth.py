"""Bearer-token checks around every tier RPC: a server interceptor and a client one.

The server interceptor authenticates each call (``authorization: Bearer
<token>`` metadata; re-checked per call, so a rotated or expired token stops
working at once), checks the method's role and that every key, namespace or
scan result belongs to the caller's tenants (:class:`~kvtier.security.access.Access`),
and only then hands the request to the servicer. ``Health`` stays open for
liveness probes. Methods it does not know (added later) need ``read`` and get
their ``keys``/``namespace`` fields checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from kvtier.backends.base import PutItem
from kvtier.keys import is_manifest_key, namespace_of, namespace_prefix
from kvtier.security.access import Access
from kvtier.security.tokens import AuthError, Principal

_CODES = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
          "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
          "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED}
ROLE = {"Lookup": "read", "Get": "read", "Contains": "read", "Scan": "read", "Stats": "read",
        "Put": "write", "Delete": "write", "Pin": "admin", "Flush": "admin",
        "Locate": "read", "Release": "read", "Reserve": "write", "Commit": "write"}
OPEN = {"Health"}


def bearer(metadata: Any) -> str | None:
    for k, v in metadata or ():
        if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
            return v[7:].strip()
    return None


def _abort(context: grpc.ServicerContext, e: AuthError) -> None:
    context.abort(_CODES.get(e.code, grpc.StatusCode.PERMISSION_DENIED), str(e))


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, access: Access):
        self.access = access

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        name = details.method.rsplit("/", 1)[-1]
        if handler is None or name in OPEN:
            return handler
        role = ROLE.get(name, "read")
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(name, role, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._unary(name, role, handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._streamed(name, role, handler.stream_unary))
        return handler._replace(stream_stream=self._streamed(name, role, handler.stream_stream))

    def _principal(self, context: grpc.ServicerContext, role: str) -> Principal:
        try:
            p = self.access.authenticate(bearer(context.invocation_metadata()))
            self.access.require(p, role)
            return p
        except AuthError as e:
            _abort(context, e)
            raise  # unreachable: abort raises

    def _unary(self, name: str, role: str, fn: Callable) -> Callable:
        access = self.access

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            p = self._principal(context, role)
            try:
                if name == "Flush" and not p.everywhere:
                    return self._flush_own(p, request, context, fn)
                self._check_request(p, request)
            except AuthError as e:
                _abort(context, e)
            out = fn(request, context)
            if "items" in {f.name for f in request.DESCRIPTOR.fields}:
                self._claim_committed(p, request, context)
            if name == "Scan" and not p.everywhere:
                keep = access.filter_entries(p, [e.key for e in out.entries])
                kept = [e for e, ok in zip(out.entries, keep) if ok]
                del out.entries[:]
                out.entries.extend(kept)
            return out

        return run

    def _streamed(self, name: str, role: str, fn: Callable) -> Callable:
        access = self.access

        def run(request_iterator: Iterator, context: grpc.ServicerContext) -> Any:
            p = self._principal(context, role)

            def checked() -> Iterator:
                for msg in request_iterator:
                    try:
                        if name == "Put" or hasattr(msg, "items"):
                            access.check_put(p, [PutItem(it.key, it.value, it.parent or None)
                                                 for it in msg.items])
                        else:
                            self._check_request(p, msg)
                    except AuthError as e:
                        _abort(context, e)
                    yield msg

            return fn(checked(), context)

        return run

    def _claim_committed(self, p: Principal, request: Any, context: grpc.ServicerContext) -> None:
        """Manifests written one-sided (NIXL commit): proved from the bytes that landed;
        one that proves nothing for the caller is deleted and the call refused."""
        for it in request.items:
            if not is_manifest_key(it.key):
                continue
            value = self.access.backend.get_many([it.key])[0]
            try:
                self.access.check_put(p, [PutItem(it.key, bytes(value or b""))])
            except AuthError as e:
                self.access.backend.delete_many([it.key])
                _abort(context, e)

    def _check_request(self, p: Principal, request: Any) -> None:
        fields = {f.name for f in request.DESCRIPTOR.fields}
        if "items" in fields:  # one-sided writes (NIXL commit): keys and parents, no bytes
            keys = [it.key for it in request.items if not is_manifest_key(it.key)
                    or self.access.owners.get(namespace_of(it.key) or b"") is not None]
            self.access.check_keys(p, keys + [it.parent for it in request.items if it.parent])
        if "keys" in fields:
            self.access.check_keys(p, list(request.keys))
        if "namespace" in fields and request.namespace:
            self.access.check_namespace(p, bytes(request.namespace))
        if "prefix" in fields and request.prefix and namespace_of(request.prefix + b":0") \
                is not None:
            self.access.check_namespace(p, namespace_of(request.prefix + b":0"))

    def _flush_own(self, p: Principal, request: Any, context: grpc.ServicerContext,
                   fn: Callable) -> Any:
        """A tenant admin's flush reaches only its own namespaces, one prefix at a time."""
        prefix = bytes(request.prefix)
        own = self.access.namespaces_of(p)
        ns = namespace_of(prefix + b":0") if prefix else None
        if ns is not None:
            self.access.check_namespace(p, ns)
            return fn(request, context)
        total = 0
        for n in own:
            np = namespace_prefix(n)
            if np.startswith(prefix) or prefix.startswith(np):
                total += fn(type(request)(prefix=max(prefix, np, key=len)), context).count
        from kvtier.proto import tier_pb2 as pb

        return pb.CountReply(count=total)


class BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never print the token
        return "BearerAuth(<token>)"

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = [*(d.metadata or ()), self._md]
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready,
                        d.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, it):  # noqa: ANN001, ANN201
        return continuation(self._details(details), it)

    def intercept_stream_stream(self, continuation, details, it):  # noqa: ANN001, ANN201
        return continuation(self._details(details), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready,  # noqa: ANN001
                 compression):  # noqa: ANN001
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (credentials, wait_for_ready,
                                                                   compression)
