"""A real ``kvtier router`` process in front of API servers, for tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvtier.testing.tier_proc import free_port, stop_process


class RouterProcess:
    """``kvtier router --prefill ... --decode ...`` on a free port; ``url`` once started."""

    def __init__(self, prefill: list[str], decode: list[str], *extra_args: str,
                 host: str = "127.0.0.1", port: int | None = None,
                 launcher: tuple[str, ...] = ()):
        self.host, self.port = host, port or free_port(host)
        self.cmd = [*launcher, sys.executable, "-m", "kvtier.cli", "router",
                    "--host", host, "--port", str(self.port),
                    *(a for u in prefill for a in ("--prefill", u)),
                    *(a for u in decode for a in ("--decode", u)), *extra_args]
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="kvtier-router-"), "router.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> RouterProcess:
        """Start and wait until it serves (``/health`` answers, whatever the backends say)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited: {self.tail()}")
            try:
                httpx.get(f"{self.url}/health", timeout=2.0)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"router not serving after {timeout_s}s: {self.tail()}")

    def health(self) -> tuple[int, dict]:
        r = httpx.get(f"{self.url}/health", timeout=5.0)
        return r.status_code, r.json()

    def wait_health(self, predicate, timeout_s: float = 30.0) -> dict:  # noqa: ANN001
        """Poll ``/health`` until ``predicate(status, body)`` holds; fail with the last body."""
        deadline = time.monotonic() + timeout_s
        while True:
            status, body = self.health()
            if predicate(status, body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"router health never matched: {status} {body}")
            time.sleep(0.2)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
