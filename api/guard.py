"""What every request passes before a route sees it (pure ASGI, so nothing reads the body first):

- `RequestGuard`, in this order, before a byte of the body is read:
  - without LADDER_API_KEY, a request to a route outside PUBLIC_PATHS whose Host names neither
    this machine's loopback (127.0.0.1, localhost, ::1), nor the address `ladder serve --host`
    listens on (LADDER_BIND_HOST), nor a name in LADDER_ALLOWED_HOSTS gets 403: a web page that
    rebinds its own name to 127.0.0.1 (DNS rebinding) names itself there, and has no key to send;
  - a POST, PUT, PATCH or DELETE whose Origin is neither absent (curl, the SDK), nor the host it
    was sent to (the console: same origin), nor in LADDER_ALLOWED_ORIGINS gets 403: a browser
    sends another site's form or no-cors fetch without asking, and Origin names that site;
  - with LADDER_API_KEY set, a request to a route outside PUBLIC_PATHS without
    `Authorization: Bearer <key>` gets 401;
  - every body has a size cap per route, checked against Content-Length up front (413 at once)
    and against the bytes actually received (413 as soon as they pass it);
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
# Methods that change state: a browser sends these cross-origin (a form, a no-cors fetch)
# without asking the server first, so their Origin is checked; reads it cannot read the answer of.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")  # `--host` values that name no one address


def hostname(host: str) -> str:
    """A Host header's (or a setting's) name without its port: "[::1]:8000" -> "::1",
    "Example.COM:8000" -> "example.com"; a bare IPv6 address stays whole."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _listed(setting: str) -> list[str]:
    return [item.strip() for item in os.environ.get(setting, "").split(",") if item.strip()]


def allowed_hosts() -> set[str] | None:
    """The names a server without a key answers to; None: any (LADDER_ALLOWED_HOSTS=*)."""
    extra = _listed("LADDER_ALLOWED_HOSTS")
    if "*" in extra:
        return None
    bound = os.environ.get("LADDER_BIND_HOST", "")
    own = [] if bound in ANY_ADDRESS else [bound]
    return {hostname(name) for name in (*LOOPBACK_NAMES, *own, *extra)}


def foreign_host(headers: dict[bytes, bytes]) -> str | None:
    """The name a request was addressed to, if it is not one this server answers to."""
    host = headers.get(b"host")
    if host is None:  # HTTP/1.0 without one; every browser sends it
        return None
    name = hostname(host.decode("latin-1"))
    allowed = allowed_hosts()
    return None if allowed is None or name in allowed else name


def foreign_origin(method: str, headers: dict[bytes, bytes]) -> str | None:
    """The web page's origin behind a state-changing request, if it is another site's. Same
    origin compares the Origin's host[:port] with the Host header, not the scheme: behind a
    TLS proxy the page is https:// and the server sees http."""
    origin = headers.get(b"origin")
    if method not in STATE_CHANGING or origin is None:
        return None
    origin = origin.decode("latin-1").strip().lower().rstrip("/")
    own = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if own and origin.partition("://")[2] == own:
        return None
    allowed = {o.lower().rstrip("/") for o in _listed("LADDER_ALLOWED_ORIGINS")}
    return None if "*" in allowed or origin in allowed else origin


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
        guarded = path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES)
        if guarded and not key and (name := foreign_host(headers)) is not None:
            return await _send_error(
                send,
                403,
                "forbidden_host",
                f"this server has no LADDER_API_KEY, so it answers only requests addressed to one "
                f"of {', '.join(sorted(allowed_hosts()))}, not to {name!r} (a web page can point "
                f"a name of its own at this machine); set LADDER_API_KEY, or allow the name "
                f"with LADDER_ALLOWED_HOSTS={name} (a comma list; * allows any)",
            )
        if (origin := foreign_origin(scope["method"], headers)) is not None:
            if origin == "null":  # a sandboxed frame, a local file: no name to allow
                page = "a web page with no origin (Origin: null)"
                fix = "serve it from an origin of its own and list that in LADDER_ALLOWED_ORIGINS"
            else:
                page = f"a web page at {origin}"
                fix = f"allow it with LADDER_ALLOWED_ORIGINS={origin} (a comma list)"
            return await _send_error(
                send,
                403,
                "forbidden_origin",
                f"{page} may not change this server's state: only the server's own pages (the "
                f"console) may; if that page is yours, {fix}",
            )
        if guarded and key:
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
