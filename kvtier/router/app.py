"""The router's HTTP app: OpenAI-compatible endpoints in front of prefill and decode pools.

FastAPI + uvicorn + httpx, the stack vLLM's own toy PD proxy uses (and that vLLM
already depends on). Per request: pick a prefill backend (least outstanding, prefix
affinity), ask it for one token with ``do_remote_decode``; pick a decode backend
(least outstanding) and send it the original request with the prefill's
``kv_transfer_params``; pass its answer through (SSE when the client streams).
Failures are JSON errors naming the backend: 503 when no backend of a kind is up,
502 when a backend fails, 504 when it times out; nothing waits without a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvtier.router.pool import Backend, NoBackend, Pool
from kvtier.router.protocol import affinity_text, decode_body, prefill_body

log = logging.getLogger("kvtier.router")
FORWARDED_HEADERS = ("authorization",)


@dataclass
class RouterConfig:
    prefill: list[str]
    decode: list[str]
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0  # a whole prefill (the longest prompt's TTFT)
    decode_timeout_s: float = 300.0  # until decode answers, then between streamed chunks
    affinity_chars: int = 1024  # 0: no prefix affinity
    affinity_slack: int = 2


class UpstreamError(Exception):
    """A backend failed; becomes a JSON error with ``status``."""

    def __init__(self, status: int, message: str, backend: Backend | None = None,
                 body: bytes | None = None, media_type: str | None = None):
        super().__init__(message)
        self.status, self.backend, self.body, self.media_type = status, backend, body, media_type


def error_response(status: int, message: str, backend: Backend | None = None) -> JSONResponse:
    """OpenAI's error shape, plus which backend it was about."""
    kind = {503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(status, "BadGateway")
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "code": status,
        "backend": backend.url if backend else None}})


class Metrics:
    """The router's own Prometheus metrics (one registry per app)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kvtier_router_requests", "Client requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.backend_requests = Counter(
            "kvtier_router_backend_requests", "Requests sent to backends, by outcome",
            ["role", "backend", "outcome"], registry=r)
        self.outstanding = Gauge("kvtier_router_backend_outstanding",
                                 "Requests in flight per backend", ["role", "backend"], registry=r)
        self.up = Gauge("kvtier_router_backend_up", "1 if the backend passed its last health check",
                        ["role", "backend"], registry=r)
        self.handoffs = Counter(
            "kvtier_router_kv_transfer_params",
            "Prefill answers with / without kv_transfer_params", ["present"], registry=r)
        self.prefill_seconds = Histogram("kvtier_router_prefill_seconds",
                                         "Prefill round trip", registry=r)


class Router:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=None, write=30.0, pool=None)
        self.prefill = Pool("prefill", cfg.prefill, timeout, cfg.health_timeout_s,
                            cfg.affinity_slack)
        self.decode = Pool("decode", cfg.decode, timeout, cfg.health_timeout_s)
        self.metrics = Metrics()
        self._health_task: asyncio.Task | None = None

    # -- health ------------------------------------------------------------------------
    async def check_health(self) -> None:
        await asyncio.gather(self.prefill.check_all(), self.decode.check_all())
        for b in self.prefill.backends + self.decode.backends:
            self.metrics.up.labels(b.kind, b.url).set(1 if b.up else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round
                log.exception("health check round failed")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())
        try:
            yield
        finally:
            self._health_task.cancel()
            await asyncio.gather(self.prefill.aclose(), self.decode.aclose())

    def status(self) -> tuple[bool, dict[str, Any]]:
        def rows(pool: Pool) -> list[dict[str, Any]]:
            return [{"url": b.url, "up": b.up, "outstanding": b.outstanding,
                     "error": b.last_error} for b in pool.backends]
        ok = any(b.up for b in self.prefill.backends) and any(b.up for b in self.decode.backends)
        return ok, {"status": "ok" if ok else "unavailable",
                    "prefill": rows(self.prefill), "decode": rows(self.decode)}

    # -- sending -----------------------------------------------------------------------
    async def _open(self, pool: Pool, path: str, body: dict[str, Any], headers: dict[str, str],
                    timeout_s: float, key: str | None = None
                    ) -> tuple[Backend, httpx.Response]:
        """Send to a live backend and return its open (streaming) response; the backend's
        ``outstanding`` stays counted until the caller releases it. An unreachable
        backend is marked down and the next one tried."""
        tried: set[Backend] = set()
        while True:
            b = pool.pick(key, frozenset(tried))
            tried.add(b)
            b.outstanding += 1
            self.metrics.outstanding.labels(b.kind, b.url).inc()
            try:
                req = b.client.build_request(
                    "POST", path, json=body, headers=headers,
                    timeout=httpx.Timeout(timeout_s, connect=self.cfg.connect_timeout_s))
                resp = await b.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                # Refused, or a pooled connection the (dead) server had closed: it got no
                # request to answer, so another backend may take it.
                self._release(b)
                b.mark_down(f"unreachable: {type(e).__name__}: {e}")
                self.metrics.up.labels(b.kind, b.url).set(0)
                self.metrics.backend_requests.labels(b.kind, b.url, "unreachable").inc()
                continue
            except httpx.TimeoutException:
                self._release(b)
                self.metrics.backend_requests.labels(b.kind, b.url, "timeout").inc()
                raise UpstreamError(504, f"{b.kind} backend {b.url} did not answer within "
                                         f"{timeout_s:g}s", b) from None
            except httpx.HTTPError as e:
                self._release(b)
                self.metrics.backend_requests.labels(b.kind, b.url, "error").inc()
                raise UpstreamError(502, f"{b.kind} backend {b.url} failed: "
                                         f"{type(e).__name__}: {e}", b) from None
            if resp.status_code >= 400:
                try:
                    data = await self._read_closing(b, resp, timeout_s)
                finally:
                    self._release(b)
                self.metrics.backend_requests.labels(b.kind, b.url, "error").inc()
                if resp.status_code < 500:  # the client's mistake: pass vLLM's answer on
                    raise UpstreamError(resp.status_code, "", b, data,
                                        resp.headers.get("content-type"))
                text = data[:500].decode(errors="replace")
                raise UpstreamError(502, f"{b.kind} backend {b.url} answered "
                                         f"{resp.status_code}: {text}", b)
            return b, resp

    def _release(self, b: Backend) -> None:
        b.outstanding -= 1
        self.metrics.outstanding.labels(b.kind, b.url).dec()

    async def _read_closing(self, b: Backend, resp: httpx.Response, timeout_s: float) -> bytes:
        try:
            return await resp.aread()
        except httpx.TimeoutException:
            raise UpstreamError(504, f"{b.kind} backend {b.url} did not finish its answer "
                                     f"within {timeout_s:g}s", b) from None
        except httpx.HTTPError as e:
            raise UpstreamError(502, f"{b.kind} backend {b.url} broke off its answer: "
                                     f"{type(e).__name__}: {e}", b) from None
        finally:
            await resp.aclose()

    async def run_prefill(self, path: str, body: dict[str, Any], chat: bool,
                          headers: dict[str, str]) -> tuple[Backend, dict[str, Any]]:
        key = affinity_text(body, self.cfg.affinity_chars)
        t0 = time.monotonic()
        b, resp = await self._open(self.prefill, path, prefill_body(body, chat), headers,
                                   self.cfg.prefill_timeout_s, key)
        try:
            data = await self._read_closing(b, resp, self.cfg.prefill_timeout_s)
        finally:
            self._release(b)
        try:
            answer = json.loads(data)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError:
            raise UpstreamError(502, f"prefill backend {b.url} answered non-JSON: "
                                     f"{data[:200]!r}", b) from None
        self.metrics.prefill_seconds.observe(time.monotonic() - t0)
        self.metrics.backend_requests.labels(b.kind, b.url, "ok").inc()
        self.metrics.handoffs.labels(str(bool(answer.get("kv_transfer_params"))).lower()).inc()
        return b, answer

    async def handle(self, path: str, request: Request) -> Response:
        chat = path.endswith("chat/completions")
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(status_code=400, content={"error": {
                "message": "request body is not JSON", "type": "BadRequestError", "code": 400}})
        if not isinstance(body, dict):
            return JSONResponse(status_code=400, content={"error": {
                "message": "request body must be a JSON object", "type": "BadRequestError",
                "code": 400}})
        rid = request.headers.get("x-request-id") or str(uuid.uuid4())
        headers = {"X-Request-Id": rid, **{h: v for h in FORWARDED_HEADERS
                                            if (v := request.headers.get(h)) is not None}}
        try:
            # Fail fast, before any prefill work, if either side has nobody up.
            self.prefill.require(), self.decode.require()
            p, answer = await self.run_prefill(path, body, chat, headers)
            d, resp = await self._open(self.decode, path, decode_body(body, answer), headers,
                                       self.cfg.decode_timeout_s)
        except NoBackend as e:
            return error_response(503, str(e))
        except UpstreamError as e:
            if e.body is not None:
                return Response(e.body, e.status, media_type=e.media_type)
            return error_response(e.status, str(e), e.backend)
        route = {"x-kvtier-prefill": p.url, "x-kvtier-decode": d.url}
        media = resp.headers.get("content-type", "application/json")
        if not body.get("stream"):
            try:
                data = await self._read_closing(d, resp, self.cfg.decode_timeout_s)
            except UpstreamError as e:
                return error_response(e.status, str(e), e.backend)
            finally:
                self._release(d)
            self.metrics.backend_requests.labels(d.kind, d.url, "ok").inc()
            return Response(data, resp.status_code, headers=route, media_type=media)
        return StreamingResponse(self._relay(d, resp), resp.status_code, headers=route,
                                 media_type=media)

    async def _relay(self, d: Backend, resp: httpx.Response) -> AsyncIterator[bytes]:
        """Pass decode's SSE bytes through; a failure mid-stream ends it with an SSE error
        event (as vLLM does) rather than a silently cut stream."""
        outcome = "ok"
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            outcome = "timeout" if isinstance(e, httpx.TimeoutException) else "error"
            msg = (f"decode backend {d.url} stalled for {self.cfg.decode_timeout_s:g}s"
                   if outcome == "timeout" else f"decode backend {d.url} broke off: {e}")
            err = error_response(502, msg, d).body
            yield b"data: " + bytes(err) + b"\n\ndata: [DONE]\n\n"
        finally:
            await resp.aclose()
            self._release(d)
            self.metrics.backend_requests.labels(d.kind, d.url, outcome).inc()

    async def models(self) -> Response:
        for pool in (self.decode, self.prefill):
            with contextlib.suppress(NoBackend):
                b = pool.pick()
                try:
                    r = await b.client.get("/v1/models", timeout=self.cfg.health_timeout_s * 5)
                except httpx.HTTPError as e:
                    return error_response(502, f"{b.kind} backend {b.url} failed: {e}", b)
                return Response(r.content, r.status_code,
                                media_type=r.headers.get("content-type"))
        return error_response(503, str(NoBackend("decode", self.decode.backends,
                                                  self.decode.describe_sources())))


def create_app(cfg: RouterConfig) -> FastAPI:
    router = Router(cfg)
    app = FastAPI(title="kvtier router", lifespan=router.lifespan)
    app.state.router = router

    def counted(path: str, response: Response) -> Response:
        router.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return counted("/v1/completions", await router.handle("/v1/completions", request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        path = "/v1/chat/completions"
        return counted(path, await router.handle(path, request))

    @app.get("/v1/models")
    async def models() -> Response:
        return counted("/v1/models", await router.models())

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, detail = router.status()
        return JSONResponse(detail, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run(cfg: RouterConfig, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info") -> None:
    import uvicorn

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level,
                timeout_keep_alive=30)
