"""What every request passes before a route sees it (pure ASGI, so nothing reads the body first):

- `RequestGuard`: with LADDER_API_KEY set, a request to any route outside PUBLIC_PATHS without
  `Authorization: Bearer <key>` gets 401 before a byte of its body is read; and every body has a
  size cap per route, checked against Content-Length up front (413 at once) and against the
  bytes actually received (413 as soon as they pass it);
- `RequestMetrics`: counts every response by route and status, 500s included (an unhandled
  error is counted on its way to the server-error handler).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body

# Routes anyone may call, key or not: liveness, readiness, metrics, the API's description, and
# the console's page and static files (the page asks for the key before it calls the API).
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/health",
        "/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
PUBLIC_PREFIXES = ("/console/",)
MIB = 2**20


def max_upload_bytes() -> int:
    return int(os.environ.get("LADDER_MAX_UPLOAD_BYTES", 50 * MIB))


def max_classes() -> int:
    """The most distinct labels an upload may have (a classifier's head has one row each)."""
    return int(os.environ.get("LADDER_MAX_CLASSES", 1000))


def body_cap(method: str, path: str) -> int:
    """The largest body a route takes. Uploads: the file cap plus room for the multipart
    envelope; predictions: 256 inputs of 10,000 characters, JSON-escaped; the rest: 1 MiB."""
    if method == "POST" and path == "/v1/files":
        return max_upload_bytes() + MIB
    if method == "POST" and path == "/v1/predict":
        return int(os.environ.get("LADDER_MAX_PREDICT_BYTES", 16 * MIB))
    return MIB


class BodyTooLarge(HTTPException):
    code = "request_too_large"

    def __init__(self, cap: int):
        super().__init__(
            413,
            f"the request body is larger than this route's {cap:,} bytes; "
            f"send less (uploads: raise LADDER_MAX_UPLOAD_BYTES on the server)",
        )


async def _send_error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(error_body(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = os.environ.get("LADDER_API_KEY")
        path = scope["path"]
        if key and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {key}".encode()):
                return await _send_error(
                    send,
                    401,
                    "invalid_api_key",
                    "missing or wrong API key; send the header "
                    "'Authorization: Bearer <LADDER_API_KEY>'",
                    [(b"www-authenticate", b"Bearer")],
                )
        cap = body_cap(scope["method"], scope["path"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            return await _send_error(send, 413, BodyTooLarge.code, BodyTooLarge(cap).detail)
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(cap)
            return message

        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped, tracking)
        except BodyTooLarge as exc:  # raised where no route turned it into a response
            if started:
                raise
            await _send_error(send, 413, exc.code, exc.detail)


class RequestMetrics:
    """Counts and times every answer, and names the process that gave it (`x-ladder-server:
    host:pid`): behind `--replicas` or a load balancer, which replica answered."""

    def __init__(self, app: ASGIApp, metrics):
        self.app = app
        self.metrics = metrics
        self.server = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-ladder-server", self.server)],
                }
            await send(message)

        try:
            await self.app(scope, receive, recording)
        except Exception:
            status[0] = 500  # the server-error handler outside answers it with a 500
            raise
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
