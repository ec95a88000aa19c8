"""A real ``kvtier serve`` in another process, for tests and benchmarks."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

from kvtier.backends import BackendError, open_backend


def free_port(host: str = "127.0.0.1") -> int:
    """A free port *below* Linux's ephemeral range (32768+).

    A port only stays free until someone binds it; vLLM, gRPC and the OS hand
    out ephemeral ports all the time, so picking outside their range keeps a
    port chosen now from being taken before the server we start binds it.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout_s``."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TierProcess:
    """Start/stop/kill a tier server on a fixed port (so clients can outlive it)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 capacity: str = "2GiB", extra_args: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = (), tls_ca: str | None = None,
                 client_options: dict[str, str] | None = None, nixl: bool = False):
        """``launcher`` prefixes the command (e.g. ``ip netns exec NODE``); give an
        explicit ``port`` then, since a free port is probed on this host. ``tls_ca``: the
        server serves TLS (``--tls-cert`` in ``extra_args``); its URL is ``grpcs://``;
        ``client_options`` (e.g. a client certificate) go to the readiness probe's client.
        ``nixl``: run the NIXL data plane (``start`` then waits until Health advertises it).
        Off by default here, unlike ``kvtier serve``: tests opt in, so the transport every
        other test reads over stays the bulk port, as their counts expect."""
        self.nixl = nixl
        self.launcher = launcher
        self.host, self.port = host, port or free_port(host)
        self.capacity, self.extra_args = capacity, extra_args
        self.tls_ca = tls_ca
        self.client_options = {**({"tls_ca": tls_ca} if tls_ca else {}), **(client_options or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="kvtier-tier-"), "tier.log")

    @property
    def url(self) -> str:
        return f"{'grpcs' if self.tls_ca else 'grpc'}://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> TierProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "kvtier.cli", "serve", "--host", self.host,
             "--port", str(self.port), "--capacity", self.capacity,
             "--nixl" if self.nixl else "--no-nixl", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log_path) as f:
                    raise RuntimeError(f"kvtier serve exited: {f.read()[-2000:]}")
            try:
                with open_backend(self.url, timeout_s=1.0, **self.client_options) as b:
                    if b.health().get("nixl_agent") or not self.nixl:
                        return self
                time.sleep(0.2)
            except BackendError:
                time.sleep(0.2)
        raise RuntimeError(f"kvtier serve not healthy after {timeout_s}s")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> TierProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
