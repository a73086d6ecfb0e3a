"""The application factory: Quart-trio app, auth policy, error handlers, ASGI middleware."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Blueprint, Response, current_app, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from interpreter.api import asgi
from interpreter.api.backpressure import BoundedHTTPConnection, BoundedRequest
from interpreter.api.envelope import envelope
from interpreter.auth.failures import FailureLimiter, Network, client_address
from interpreter.auth.keys import KeyAuthenticator, UnknownKey
from interpreter.auth.managed import ManagedKeys, RateState
from interpreter.auth.principals import Principal
from interpreter.egress.service import SandboxNetwork
from interpreter.errors import InterpreterError, RateLimited, StoreUnavailable, UnsupportedMediaType
from interpreter.execution.executor import Executor
from interpreter.execution.programmatic import Programmatic
from interpreter.execution.python import PythonRuns
from interpreter.files.catalog import Catalog
from interpreter.health import HealthRegistry
from interpreter.metrics import Metrics
from interpreter.settings import Settings
from interpreter.stores.open import Stores
from interpreter.stores.protocols import StoreError
from sandboxes.languages import LanguageSpec

log = logging.getLogger("interpreter.api")
security_log = logging.getLogger("interpreter.security")

# Reachable without a key: liveness and the API description (only served with ENABLE_DOCS).
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/docs.js", "/docs/docs.css"})
ADMIN_PREFIX = "/api/v1/admin"
# Bodies of these content types are accepted on POST/PUT/PATCH (as the reference does); uploads are multipart.
ACCEPTED_BODY_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded", "text/plain")
UPLOAD_PATHS = ("/upload",)
STORE_RETRY_AFTER_S = 2


@dataclass
class AppDeps:
    """What the routes need from the rest of the process; main.py fills it in."""

    settings: Settings
    health: HealthRegistry
    authenticator: KeyAuthenticator
    started_at: float
    executor: Executor
    languages: Mapping[str, LanguageSpec]
    stores: Stores
    catalog: Catalog
    python: PythonRuns | None = None
    programmatic: Programmatic | None = None
    shutdown: trio.Event = field(default_factory=trio.Event)  # set when the server starts to stop
    failures: FailureLimiter | None = None
    keys: ManagedKeys | None = None
    metrics: Metrics = field(default_factory=Metrics)
    trusted_proxies: tuple[Network, ...] = ()
    network: SandboxNetwork | None = None  # ENABLE_SANDBOX_NETWORK


def current_deps() -> AppDeps:
    deps: AppDeps = current_app.extensions["deps"]
    return deps


def current_principal() -> Principal:
    principal: Principal = g.principal
    return principal


def client_ip(deps: AppDeps, connection: Any = None) -> str:
    """The client's address (X-Forwarded-For believed only from TRUSTED_PROXIES)."""
    connection = connection if connection is not None else request
    return client_address(connection.remote_addr, connection.headers.get("x-forwarded-for"), deps.trusted_proxies)


async def user_principal(deps: AppDeps, headers: Any) -> Principal:
    """An environment key, a JWT, or a managed key (whose rate-limit state goes to ``g.rate``)."""
    try:
        return deps.authenticator.user(headers)
    except UnknownKey as unknown:
        if deps.keys is None:
            raise
        principal, g.rate = await deps.keys.principal(unknown.key)
        return principal


async def auth_failed(deps: AppDeps, client: str, path: str, exc: InterpreterError) -> None:
    """A security event (who and where, never the key), counted by the failure limiter."""
    security_log.warning(
        "authentication failed",
        extra={"fields": {"client": client, "path": path, "reason": str(exc), "status": exc.status}},
    )
    deps.metrics.auth_failures.inc()
    if deps.failures is not None and exc.status == 401:
        await deps.failures.failed(client)


def create_app(deps: AppDeps, *, blueprints: Iterable[Blueprint] = ()) -> asgi.ASGIApp:
    """The ASGI application: the Quart app wrapped in our middleware.

    ``blueprints`` are extra routers mounted beside the built-in ones (tests mount routes there).
    """
    settings = deps.settings
    from interpreter.api import admin, execute, files, health, metrics, openapi, programmatic, stream, upload

    app = QuartTrio("interpreter")
    app.request_class = BoundedRequest
    app.asgi_http_class = BoundedHTTPConnection
    app.config.update(
        MAX_CONTENT_LENGTH=None,  # BodyCap enforces per-route caps while the body streams in
        PROVIDE_AUTOMATIC_OPTIONS=False,  # OPTIONS is CORS' business; without CORS it is a 405
        PROPAGATE_EXCEPTIONS=False,
        BODY_TIMEOUT=60,
        RESPONSE_TIMEOUT=None,  # runs may take MAX_EXECUTION_TIME; keepalives keep the client waiting
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["deps"] = deps

    @app.before_request
    async def content_type_gate() -> None:
        if request.method in ("POST", "PUT", "PATCH") and not request.path.startswith(UPLOAD_PATHS):
            content_type = (request.headers.get("content-type") or "").lower()
            if not any(accepted in content_type for accepted in ACCEPTED_BODY_TYPES):
                shown = content_type.split(";")[0][:60] or "none"
                raise UnsupportedMediaType(f"Unsupported content type: {shown}")

    @app.before_request
    async def authenticate() -> None:
        path = request.path
        public_metrics = path == "/metrics" and not settings.metrics_auth_enabled
        if path in PUBLIC_PATHS or request.method == "OPTIONS" or public_metrics:
            g.principal = None
            return
        client = client_ip(deps)
        if deps.failures is not None:
            await deps.failures.check(client)
        g.rate = None
        try:
            if path.startswith(ADMIN_PREFIX):
                g.principal = deps.authenticator.admin(request.headers)
            else:
                g.principal = await user_principal(deps, request.headers)
        except RateLimited:
            raise  # a known key over its limit: not an authentication failure
        except InterpreterError as exc:
            await auth_failed(deps, client, path, exc)
            raise

    @app.after_request
    async def count_request(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        deps.metrics.requests.inc(route=rule, status=str(response.status_code))
        return response

    @app.after_request
    async def rate_limit_headers(response: Response) -> Response:
        rate: RateState | None = g.get("rate")
        if rate is not None:
            response.headers["X-RateLimit-Limit"] = str(rate.limit)
            response.headers["X-RateLimit-Remaining"] = str(max(0, rate.remaining))
            response.headers["X-RateLimit-Reset"] = str(rate.reset_s)
        return response

    @app.errorhandler(InterpreterError)
    async def interpreter_error(exc: InterpreterError) -> Response:
        if isinstance(exc, RateLimited):
            deps.metrics.rate_limited.inc(reason="key_limit" if exc.limit is not None else "auth_failures")
        return _envelope_response(
            exc.status,
            str(exc),
            details=exc.details,
            error_type=exc.error_type,
            headers=exc.headers,
            retry_after_s=getattr(exc, "retry_after_s", None) if exc.status == 429 else None,
        )

    @app.errorhandler(StoreError)
    async def store_error(exc: StoreError) -> Response:
        log.error("store call failed", extra={"fields": {"error": str(exc)}})
        deps.metrics.store_errors.inc()
        failure = StoreUnavailable(retry_after_s=STORE_RETRY_AFTER_S)
        return _envelope_response(failure.status, str(failure), headers=failure.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {}
        if status == 405:
            allowed = getattr(exc, "valid_methods", None) or []
            headers["Allow"] = ", ".join(allowed)
        message = {404: "Not found", 405: "Method not allowed", 413: "Request body too large"}.get(
            status, exc.name or "Error"
        )
        return _envelope_response(status, message, headers=headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        # The traceback goes to the log (always, with the request id); never into the response.
        log.error("unhandled exception", exc_info=exc)
        return _envelope_response(500, "An unexpected error occurred")

    app.register_blueprint(health.blueprint)
    app.register_blueprint(execute.blueprint)
    app.register_blueprint(programmatic.blueprint)
    app.register_blueprint(admin.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(stream.blueprint)
    app.register_blueprint(upload.blueprint)
    app.register_blueprint(files.blueprint)
    if settings.enable_docs:
        app.register_blueprint(openapi.blueprint)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)

    json_cap, upload_cap = settings.max_request_json_bytes, settings.max_upload_bytes

    def cap_for(path: str) -> int:
        return upload_cap if path.startswith(UPLOAD_PATHS) else json_cap

    wrapped: asgi.ASGIApp = asgi.BodyCap(app, cap_for)  # type: ignore[arg-type]
    wrapped = asgi.StripV1Prefix(wrapped)
    if settings.enable_cors:
        wrapped = asgi.Cors(wrapped, settings.cors_origins)
    return asgi.RequestContext(wrapped)


def _envelope_response(
    status: int,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
    retry_after_s: int | None = None,
) -> Response:
    request_id = request.scope.get("request_id")
    body = envelope(
        status,
        message,
        request_id=request_id if isinstance(request_id, str) else None,
        details=details,
        error_type=error_type,
        retry_after_s=retry_after_s,
    )
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
