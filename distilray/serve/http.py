"""The Ingress's HTTP layer: the FastAPI app with its error handlers and middlewares, the
fast path for valid classify requests, and bearer-token checks.

Importing this needs no Ray: the metrics middleware creates its Ray metrics on first use,
in the replica process.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilray.config import ServeConfig
from distilray.errors import ConfigError
from distilray.serve.schema import describe_validation_errors, error_json

CLASSIFY_PATH = "/v1/classify"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]

FAST_CLASSIFY: dict[str, Callable[..., Any]] = {}
"""Per replica process: the Ingress instance's fast classify handler, by its app's key
(`app.state.fast_path_key`). The Ingress, a module-level class pickled by reference,
fills this very dict; `ClassifyFastPath` reads it."""

ADMISSION: list[tuple[asyncio.AbstractEventLoop, Callable[[list[tuple[bytes, bytes]], float], Any]]] = []
"""Per replica process: (event loop, check) of the HTTP front's queue, registered by the
Ingress once it has answered a request; `check(headers, waited_s)` is the 503 answer for a
request that the queue would refuse now, or None. `AdmissionGate` reads it."""

TCP_INFO_LAST_DATA_RECV = 52
"""Byte offset of `tcpi_last_data_recv` (ms since data last arrived) in Linux's `struct tcp_info`."""

FRONT_MIDDLEWARES = "distilray.serve.http:front_middlewares"
"""Import path of Serve's proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""


def front_middlewares() -> list[Any]:
    """Serve's proxy callback: middlewares that Serve wraps around a direct-ingress replica's
    whole HTTP app, outside its own per-request handling."""
    from starlette.middleware import Middleware

    return [Middleware(AdmissionGate)]


class AdmissionGate:
    """503 for a `POST /v1/classify` that the queue would refuse, before Serve's per-request
    work (request ids, metadata, the disconnect watcher, metrics), FastAPI and the body.

    Under a flood about half the requests are refused, and through Serve's handling each
    refusal took that per-request work on the Ingress's loop, whose CPU the 2 cores' forward
    passes and the loop's next accept wait for. While the queue is refusing
    requests, the check also counts how long the request sat in the kernel before it was
    read (`socket_wait_s`): uvloop accepts one connection per loop iteration, so in a burst
    of new connections the last wait there for hundreds of milliseconds, and admitting them
    carried that wait into their latency.
    A request the app must answer otherwise (a token that does not match: 401; a body over
    the limit or not JSON) goes through. Active only on the loop that registered the check
    (Serve may run user code on another loop).
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (ADMISSION and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].endswith(CLASSIFY_PATH)):
            loop, check = ADMISSION[-1]
            if loop is asyncio.get_running_loop():
                t0 = time.perf_counter()
                response = check(scope["headers"], socket_wait_s(receive))
                if response is not None:
                    await response(scope, receive, send)
                    _record(CLASSIFY_PATH, response.status_code, t0)
                    return
        await self.app(scope, receive, send)


def socket_wait_s(receive: Any) -> float:
    """Seconds since the request's last bytes reached the kernel, read from the connection of
    the HTTP server calling the app (uvicorn's `receive` is a method of its request cycle,
    which holds the transport): 0.0 where that is not known (another server, not Linux)."""
    try:
        sock = receive.__self__.transport.get_extra_info("socket")
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, TCP_INFO_LAST_DATA_RECV)[0] / 1000
    except (AttributeError, OSError, struct.error, TypeError):
        return 0.0


def gate_passes(headers: list[tuple[bytes, bytes]], token: str | None, max_bytes: int) -> bool:
    """Whether the gate may answer a classify request with these headers: one the app would
    not refuse for its token, body size or content type."""
    if not _json_content_type(headers):
        return False
    length = authorization = None
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"authorization":
            authorization = value
    if length is None or not length.isdigit() or int(length) > max_bytes:
        return False
    return token is None or bearer_matches(token, (authorization or b"").decode("latin-1"))


_METRICS: list[Any] = []


def _record(route: str, status: int, t0: float) -> None:
    """Count an answer in `distilray_requests` and `distilray_request_latency_ms` (the Ray
    metrics are created on first use, in the replica process)."""
    if not _METRICS:
        from ray.serve.metrics import Counter, Histogram

        _METRICS.extend([
            Counter("distilray_requests", "HTTP requests answered, by status",
                    tag_keys=("route", "status")),
            Histogram("distilray_request_latency_ms", "Ingress-side latency",
                      boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))])
    requests, latency = _METRICS
    requests.inc(tags={"route": route, "status": str(status)})
    latency.observe((time.perf_counter() - t0) * 1000, tags={"route": route})


def make_fastapi_app(cfg: ServeConfig) -> Any:
    """The Ingress's FastAPI app for `cfg`: title, error handlers and middlewares; no routes
    yet (`deployments.ingress_class` attaches them).

    Middleware order, outermost first (Starlette runs the one added last outermost):
    1. `StatusMetricsMiddleware` counts every answer, fast path and errors included;
    2. `BodyLimit` answers 413 to bodies over `max_request_bytes`;
    3. `ClassifyFastPath` answers valid `POST /v1/classify` bodies past FastAPI's layers;
    4. FastAPI's routes, whose validation errors the handlers below answer.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(
        title="distilray classifier",
        version="1",
        description="Text classification with a fine-tuned DistilBERT checkpoint, on Ray Serve. "
                    "Send a bearer token in `Authorization` when the server has one configured.")
    app.state.fast_path_key = os.urandom(8).hex()  # this app's handler in FAST_CLASSIFY
    app.add_middleware(ClassifyFastPath, key=app.state.fast_path_key)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.add_middleware(StatusMetricsMiddleware)
    max_texts, max_chars = cfg.max_texts, cfg.max_text_chars

    async def invalid(request: Any, exc: RequestValidationError) -> Any:
        status, body = describe_validation_errors(exc.errors(), exc.body, max_texts, max_chars)
        return _json(status, body)

    async def http_error(request: Any, exc: StarletteHTTPException) -> Any:
        # e.g. a body that is not UTF-8 ("error parsing the body"), unknown paths, wrong methods
        kind = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        return error_json(exc.status_code, kind, str(exc.detail), **(exc.headers or {}))

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    return app


def _json(status: int, body: Any) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=body.model_dump())


class StatusMetricsMiddleware:
    """Count every answer by route and status, 4xx included (plain ASGI: ~µs per request)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            _record(getattr(scope.get("route"), "path", "unmatched"), status[0], t0)


class BodyLimit:
    """413 for a body over `limit` bytes, by its Content-Length or, when chunked, as it comes.

    Texts are truncated to max_length tokens rather than refused by length, so this is what
    bounds the tokenising and memory one request can cost.
    """

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._too_large(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # client gone: let the app see it
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
        await self.app(scope, _replay({"type": "http.request", "body": b"".join(chunks),
                                       "more_body": False}, receive), send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        from distilray.serve.oip import error_response, is_v2

        message = (f"the request body is over {self.limit} bytes (serve.max_request_bytes); "
                   "send fewer or shorter texts per request")
        response = (error_response(413, message) if is_v2(_route_path(scope))
                    else error_json(413, "request_too_large", message))
        await response(scope, receive, send)


class ClassifyFastPath:
    """Valid `POST /v1/classify` requests straight to the Ingress, past FastAPI's layers.

    Under load a third of the Ingress's CPU went to FastAPI's router, dependency solving and
    exception middleware around a handler that needs none of them (py-spy). The Ingress's
    handler validates the raw body with the same pydantic models; when it returns None
    (invalid or non-JSON body, missing token) the buffered body is replayed into the FastAPI
    route, so every error is answered exactly as FastAPI would. Sits inside
    `StatusMetricsMiddleware`.
    """

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key
        self.route = type("Route", (), {"path": CLASSIFY_PATH})()  # the metrics' route label

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        handler = FAST_CLASSIFY.get(self.key)
        if (handler is None or scope["type"] != "http" or scope["method"] != "POST"
                or _route_path(scope) != CLASSIFY_PATH or not _json_content_type(scope["headers"])):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone: let FastAPI see it
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        response = await handler(body, scope["headers"])
        if response is None:
            await self.app(scope, _replay(
                {"type": "http.request", "body": body, "more_body": False}, receive), send)
            return
        scope["route"] = self.route
        await response(scope, receive, send)


def _route_path(scope: dict) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> bool:
    """The content types FastAPI parses as JSON for a body parameter: none or `application/json`."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return True


def _replay(first: dict, receive: Any) -> Any:
    """A `receive` that gives the message already read (`first`) once, then the real ones."""
    pending = [first]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()
    return replayed


def server_token(auth_token_env: str, auth_token_file: str | None) -> str | None:
    """The bearer token this server requires, or None when auth is off."""
    if auth_token_file:
        path = Path(auth_token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"serve.auth_token_file={auth_token_file}: cannot read it "
                              f"({exc.strerror}); fix the path or unset it") from None
        if not token:
            raise ConfigError(f"serve.auth_token_file={auth_token_file} is empty")
        return token
    token = os.environ.get(auth_token_env, "").strip()
    return token or None


def bearer_matches(token: str | None, authorization: str) -> bool:
    """Whether an `Authorization` header value carries `token` (always, when auth is off)."""
    if token is None:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())
