"""A TCP proxy in its own process that adds latency on demand: a slow tier, for real.

Every chunk is delivered ``delay`` seconds after it arrived, in both directions
and in order (latency, like ``tc netem delay``, not a bandwidth cap), so one
gRPC round trip costs ``2 * delay``. It needs no root, unlike netem in a network
namespace. The parent steers it over stdin (``delay SECONDS``, ``stats``) and
reads one JSON line back per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from typing import Any

from kvtier.testing.tier_proc import free_port


class DelayProxy:
    """Parent-side handle: ``127.0.0.1:port`` forwards to ``target`` (``host:port``)."""

    def __init__(self, target: str, port: int | None = None):
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.testing.delay_proxy", str(self.port), target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()
        self.stats()  # answers once it listens

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"delay proxy exited ({self.proc.poll()})")
        return json.loads(answer)

    def set_delay(self, seconds: float) -> None:
        self._ask(f"delay {seconds}")

    def stats(self) -> dict[str, Any]:
        """``connections`` accepted and ``bytes_in`` from clients, so far."""
        return self._ask("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- child side ------------------------------------------------------------------
class _State:
    delay = 0.0
    connections = 0
    bytes_in = 0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                from_client: bool) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await q.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            if from_client:
                _State.bytes_in += len(data)
            q.put_nowait((loop.time() + _State.delay, data))
    q.put_nowait((loop.time() + _State.delay, b""))
    with contextlib.suppress(OSError):
        await sender


async def _serve(port: int, target: str) -> None:
    host, tport = target.rsplit(":", 1)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        _State.connections += 1
        try:
            tr, tw = await asyncio.open_connection(host, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, tw, True), _pipe(tr, cw, False))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def commands() -> None:
        for line in sys.stdin:
            op, *arg = line.split()
            if op == "delay":
                _State.delay = float(arg[0])
            print(json.dumps({"delay": _State.delay, "connections": _State.connections,
                              "bytes_in": _State.bytes_in}), flush=True)
        loop.call_soon_threadsafe(done.set_result, None)  # parent gone: stop

    threading.Thread(target=commands, daemon=True).start()
    async with server:
        await done


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), sys.argv[2]))
