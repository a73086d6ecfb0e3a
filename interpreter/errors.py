"""The error tree. Each class carries the HTTP status and the ``error_type`` of DESIGN §8.

Messages are written for the client: never a host path, a key or a traceback. Internals go to
the log with the request id.
"""

from __future__ import annotations

from typing import Any, ClassVar

# error_type by status (reference §1.4); anything else is internal_server.
ERROR_TYPES: dict[int, str] = {
    400: "validation",
    401: "authentication",
    403: "authorization",
    404: "resource_not_found",
    405: "validation",
    408: "timeout",
    409: "resource_conflict",
    413: "resource_exhausted",
    415: "validation",
    422: "validation",
    429: "rate_limited",
    502: "external_service",
    503: "service_unavailable",
    504: "timeout",
}


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "internal_server")


class SettingsError(Exception):
    """An invalid setting; the CLI prints it as one line and exits 2."""


class InterpreterError(Exception):
    """Base of every error that becomes an HTTP error envelope."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_server"
    message: ClassVar[str] = "An unexpected error occurred"

    def __init__(self, message: str | None = None, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message or self.message)
        self.details = details

    @property
    def headers(self) -> dict[str, str]:
        return {}


class ValidationFailed(InterpreterError):
    status = 422
    error_type = "validation"
    message = "Request validation failed"


class BadRequest(InterpreterError):
    status = 400
    error_type = "validation"
    message = "Bad request"


class UnsupportedMediaType(InterpreterError):
    status = 415
    error_type = "validation"
    message = "Unsupported content type"


class AuthenticationFailed(InterpreterError):
    status = 401
    error_type = "authentication"
    message = "Invalid API key"

    @property
    def headers(self) -> dict[str, str]:
        # Lets browsers and URL-credential clients know Basic is accepted.
        return {"WWW-Authenticate": 'Basic realm="interpreter", charset="UTF-8"'}


class Forbidden(InterpreterError):
    status = 403
    error_type = "authorization"
    message = "Forbidden"


class NotFound(InterpreterError):
    status = 404
    error_type = "resource_not_found"
    message = "Not found"


class Conflict(InterpreterError):
    status = 409
    error_type = "resource_conflict"
    message = "The request conflicts with the server's state"


class RequestTimeout(InterpreterError):
    status = 408
    error_type = "timeout"
    message = "The request body stopped arriving"


class RateLimited(InterpreterError):
    status = 429
    error_type = "rate_limited"
    message = "Rate limit exceeded"

    def __init__(self, message: str | None = None, *, retry_after_s: int, limit: int | None = None,
                 reset_s: int | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.retry_after_s = max(1, retry_after_s)
        self.limit, self.reset_s = limit, reset_s

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after_s)}
        if self.limit is not None:  # a key's rate limit (not the auth-failure limiter)
            headers |= {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": str(self.reset_s or self.retry_after_s)}  # fmt: skip
        return headers


class ServiceUnavailable(InterpreterError):
    status = 503
    error_type = "service_unavailable"
    message = "Service temporarily unavailable"

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class StoreUnavailable(ServiceUnavailable):
    """A KV or blob store call failed or timed out (DESIGN §4)."""

    message = "Storage is temporarily unavailable"
