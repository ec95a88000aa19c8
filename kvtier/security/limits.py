"""Resource limits that keep one slow or hostile client from starving the others.

- A client-streaming call (an upload) that sends nothing for ``idle_s`` is
  cancelled: it would otherwise hold one of the server's worker threads for as
  long as the client likes, and a handful of stalled uploaders would block
  every other request.
- The bulk port holds at most ``max_connections`` connections (one thread
  each); past that a new connection gets a refusal frame and is closed (its
  client reads over gRPC instead), and a connection idle for ``idle_s`` is
  closed (its client reconnects on its next read).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger("kvtier.limits")


class StreamWatchdog(grpc.ServerInterceptor):
    """Cancels client-streaming calls whose client has sent nothing for ``idle_s``."""

    def __init__(self, idle_s: float, on_cancel: Callable[[str], None] | None = None):
        self.idle_s = idle_s
        self.on_cancel = on_cancel
        self._active: dict[int, list] = {}  # id -> [context, last message time, method]
        self._lock = threading.Lock()
        self.cancelled = 0
        threading.Thread(target=self._watch, name="kvtier-stream-watchdog", daemon=True).start()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or (handler.stream_unary is None and handler.stream_stream is None):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._tracked(method, handler.stream_unary))
        return handler._replace(stream_stream=self._tracked(method, handler.stream_stream))

    def _tracked(self, method: str, fn: Callable) -> Callable:
        def run(request_iterator: Iterator, context: grpc.ServicerContext) -> Any:
            entry = [context, time.monotonic(), method]
            with self._lock:
                self._active[id(entry)] = entry

            def messages() -> Iterator:
                for msg in request_iterator:
                    entry[1] = time.monotonic()
                    yield msg
                entry[1] = float("inf")  # the client is done sending: never idle

            try:
                return fn(messages(), context)
            finally:
                with self._lock:
                    self._active.pop(id(entry), None)

        return run

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.05, min(1.0, self.idle_s / 4)))
            now = time.monotonic()
            with self._lock:
                stalled = [e for e in self._active.values() if now - e[1] > self.idle_s]
            for e in stalled:
                e[1] = float("inf")
                self.cancelled += 1
                log.warning("%s stream idle for more than %gs: cancelled (stalled client)",
                            e[2], self.idle_s)
                if self.on_cancel is not None:
                    self.on_cancel("stalled_stream")
                e[0].cancel()


class ConnectionLimit:
    """At most ``max_connections`` bulk connections; each idle for ``idle_s`` at most."""

    def __init__(self, max_connections: int, idle_s: float):
        self.max_connections, self.idle_s = max_connections, idle_s
        self._n = 0
        self._lock = threading.Lock()
        self.refused = 0

    def admit(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._n >= self.max_connections:
                self.refused += 1
                return False
            self._n += 1
        if self.idle_s > 0:
            sock.settimeout(self.idle_s)
        return True

    def release(self) -> None:
        with self._lock:
            self._n = max(0, self._n - 1)

    @property
    def active(self) -> int:
        return self._n


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_payloads(threshold: int = 64 << 10) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap.

    glibc raises its mmap threshold each time such a chunk is freed (up to 32 MiB),
    after which payloads come from the heap, and an evicted payload's memory stays
    in the process: a full store churning through evictions grew 23 % past its
    capacity in ``kvtier bench reliability`` (2-core machine, 256 KiB..1 MiB values),
    2.7 % with a fixed threshold. Fixing it (as ``MALLOC_MMAP_THRESHOLD_`` would)
    returns each evicted payload to the OS. False where this is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
