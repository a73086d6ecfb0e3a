"""The one error envelope (DESIGN §8) and request ids."""

from __future__ import annotations

import re
import time
from typing import Any

from interpreter.errors import error_type_for
from interpreter.ids import new_id

_SAFE_INCOMING_ID = re.compile(r"^[A-Za-z0-9._:-]{8,64}$")


def new_request_id() -> str:
    """A 21-character nanoid-style id, as the reference uses."""
    return new_id()


def request_id_from(incoming: str | None) -> str:
    """Keep a well-formed upstream X-Request-ID (for tracing through proxies); otherwise make one."""
    if incoming and _SAFE_INCOMING_ID.match(incoming):
        return incoming
    return new_request_id()


def envelope(
    status: int,
    message: str,
    *,
    request_id: str | None,
    details: list[dict[str, Any]] | None = None,
    error_type: str | None = None,
    retry_after_s: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "error": message,
        "error_type": error_type or error_type_for(status),
        "details": details,
        "request_id": request_id,
        "timestamp": time.time(),
    }
    if retry_after_s is not None:
        body["retry_after_seconds"] = retry_after_s
    return body
