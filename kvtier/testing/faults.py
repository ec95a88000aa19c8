"""Faults injected into a real process from outside, for tests: no hook in the code under test.

:func:`close_tcp_port` kills one listener of a running server (say, a tier
server's bulk port) and the connections it accepted, leaving the rest of the
process (its gRPC port) serving: the fault a crashed listener thread, or a
proxy that drops one port, would cause.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket

import psutil

# pidfd_getfd(2) is 438 on every architecture that uses the generic syscall table.
_SYS_PIDFD_GETFD = 438


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    out = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
    if out < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)} (needs Linux >= 5.6 and "
                      "ptrace rights over the process)")
    return out


def close_tcp_port(pid: int, port: int, listener: bool = True) -> int:
    """Shut down every TCP socket of process ``pid`` bound to local ``port``.

    The listener stops accepting (connections are refused; ``listener=False``
    spares it) and each accepted connection is shut down (its peer reads
    end-of-stream, as after a reset by a middlebox). The sockets are
    duplicated into this process with ``pidfd_getfd`` and ``shutdown`` acts on
    the socket itself, so the target sees exactly what a dead listener gives.
    Returns how many sockets were shut down.
    """
    if platform.system() != "Linux":
        raise OSError("close_tcp_port needs Linux (pidfd_getfd)")
    conns = [c for c in psutil.Process(pid).net_connections(kind="tcp")
             if c.laddr and c.laddr.port == port and c.fd >= 0
             and (listener or c.status != psutil.CONN_LISTEN)]
    pidfd = os.pidfd_open(pid)
    try:
        for c in conns:
            with socket.socket(fileno=_pidfd_getfd(pidfd, c.fd)) as s:
                s.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(pidfd)
    return len(conns)
