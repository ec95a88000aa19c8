"""``kvtier serve`` as an operator runs it: the console script, its signals, its port."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey
from tests.helpers.servers import free_port, kvtier_cmd, running_tier, server_log


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """Server output, line by line, without ever blocking the test on a pipe read."""
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for(q: queue.Queue[str], needle: str, timeout_s: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed within {timeout_s}s; got: {''.join(seen)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_console_script_serves_and_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen([*kvtier_cmd(), "serve", "--port", str(port), "--capacity", "64MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = _lines(proc)
        _wait_for(out, f"listening on grpc://127.0.0.1:{port}", 30)
        k = BlockKey(os.urandom(16), 0, 0, os.urandom(32))
        value = payload.encode(k, payload.layout_digest("t"), b"x" * 1000)
        with GrpcBackend(f"grpc://127.0.0.1:{port}", timeout_s=5) as b:
            assert b.put_many([PutItem(k.encode(), value)]) == 1
            assert bytes(b.get_many([k.encode()])[0]) == value
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(15) == 0, "a signalled server should exit 0 after draining"
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_server_on_a_busy_port_fails_with_a_message() -> None:
    """gRPC binds with SO_REUSEPORT by default: two servers could share a port and split the
    clients between two separate stores. The second one must refuse to start instead."""
    with running_tier(capacity="64MiB") as tier:
        r = subprocess.run([*kvtier_cmd(), "serve", "--port", str(tier.port)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert f"cannot listen on 127.0.0.1:{tier.port}" in r.stderr
        assert "Traceback" not in r.stderr
        assert tier.proc is not None and tier.proc.poll() is None, server_log(tier)
