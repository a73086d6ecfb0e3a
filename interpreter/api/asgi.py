"""ASGI middleware around the Quart app, outermost first:

``RequestContext`` (request id, security headers, the status-aware request log) → ``Cors`` →
``StripV1Prefix`` → ``BodyCap`` → Quart. They are plain ASGI so that what they answer themselves
(a 413 before the body is read, a CORS preflight) gets the same headers and envelope as the app's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from interpreter.api.envelope import envelope, request_id_from
from interpreter.logs import request_id_var

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("interpreter.http")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
    (b"permissions-policy", b"geolocation=(), microphone=(), camera=()"),
    # Everything we serve, the docs page included, comes from our own origin (no CDN).
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class RequestContext:
    """Gives every request an id (``X-Request-ID``), adds the security headers to every response
    and logs one line per request at a level that follows the status (5xx error, 4xx warning,
    else debug). The logged path never includes the query string."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, b"x-request-id"))
        scope["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status: int | None = None
        https = scope.get("scheme") in ("https", "wss")

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers += [*SECURITY_HEADERS, (b"x-request-id", request_id.encode())]
                if https:
                    headers.append(HSTS)
                message["headers"] = headers
            elif message["type"] == "websocket.accept":
                status = 101
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error in the ASGI app")
            if status is None and scope["type"] == "http":
                await send_json(
                    send_with_headers, 500, envelope(500, "An unexpected error occurred", request_id=request_id)
                )
        finally:
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            code = status or 0
            level = logging.ERROR if code >= 500 else logging.WARNING if code >= 400 else logging.DEBUG
            log.log(
                level,
                "request",
                extra={
                    "fields": {
                        "method": scope.get("method", "WS"),
                        "path": scope.get("path"),
                        "status": code,
                        "duration_ms": elapsed_ms,
                        "client": (scope.get("client") or ("?",))[0],
                    }
                },
            )
            request_id_var.reset(token)


class Cors:
    """CORS for browsers (``ENABLE_CORS``). With no ``CORS_ORIGINS`` any origin may read responses
    but no credentials are allowed; a listed origin is echoed back with credentials allowed."""

    ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
    EXPOSE = (
        b"Content-Disposition, X-Request-ID, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset"
    )

    def __init__(self, app: ASGIApp, origins: Iterable[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    def _allow(self, origin: str) -> list[tuple[bytes, bytes]]:
        if not self.origins or "*" in self.origins:
            return [(b"access-control-allow-origin", b"*")]
        if origin in self.origins:
            return [
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
            ]
        return []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        allow = self._allow(origin) if origin else []
        if not allow:
            await self.app(scope, receive, send)
            return
        requested_method = _header(scope, b"access-control-request-method")
        if scope["method"] == "OPTIONS" and requested_method:
            requested_headers = _header(scope, b"access-control-request-headers") or ""
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *allow,
                        (b"access-control-allow-methods", self.ALLOW_METHODS),
                        (b"access-control-allow-headers", requested_headers.encode("latin-1") or b"*"),
                        (b"access-control-max-age", b"600"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", ()),
                    *allow,
                    (b"access-control-expose-headers", self.EXPOSE),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)


class StripV1Prefix:
    """Every route except ``/api/v1/admin/...`` also answers under ``/v1`` (LibreChat's default base URL)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (path == "/v1" or path.startswith("/v1/")):
            rest = path[3:] or "/"
            if not rest.startswith("/api/"):
                raw: bytes = scope.get("raw_path") or path.encode()
                scope = {**scope, "path": rest, "raw_path": raw[3:] or b"/"}
        await self.app(scope, receive, send)


class BodyCap:
    """Refuses a request body over its route's cap while it streams in, before it is buffered.

    A declared ``Content-Length`` over the cap is answered 413 without reading anything. A body
    without one (chunked) is counted as it arrives: past the cap the app is told the client went
    away (so it stops) and the 413 is sent in its place.
    """

    def __init__(self, app: ASGIApp, cap_for: Callable[[str], int]) -> None:
        self.app = app
        self.cap_for = cap_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap_for(scope["path"])
        request_id = scope.get("request_id")
        message = f"Request body exceeds the limit of {cap} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            await send_json(send, 413, envelope(413, message, request_id=request_id), [(b"connection", b"close")])
            return

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > cap:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return event

        async def tracking_send(event: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return  # the 413 below replaces whatever the app tries to say now
            if event["type"] == "http.response.start":
                response_started = True
            await send(event)

        await self.app(scope, counting_receive, tracking_send)
        if exceeded and not response_started:
            await send_json(send, 413, envelope(413, message, request_id=request_id), [(b"connection", b"close")])
