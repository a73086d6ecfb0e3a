"""Reading request bodies into pydantic models, with the envelope's 415/422 shapes."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request

from interpreter.errors import UnsupportedMediaType, ValidationFailed

M = TypeVar("M", bound=BaseModel)


def _field(loc: tuple[Any, ...]) -> str:
    return " -> ".join(["body", *(str(part) for part in loc)])


async def json_body(model: type[M]) -> M:
    """Parse and validate the JSON body; unknown fields are the model's business (LibreChat sends extras).

    Raises:
        UnsupportedMediaType: the body is not declared as JSON (415).
        ValidationFailed: the body is not JSON or does not fit ``model`` (422, ``details`` per field).
    """
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "text/plain") and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"Unsupported content type: {content_type[:60] or 'none'}; send application/json")
    raw = await request.get_data(as_text=False)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else "body is not UTF-8"
        raise ValidationFailed(
            details=[{"field": "body", "message": f"JSON decode error: {message}", "code": "json_invalid"}]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(details=validation_details(exc)) from None


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """The envelope's ``details`` for a pydantic error: one ``{field, message, code}`` per problem."""
    return [
        {"field": _field(err["loc"]), "message": err["msg"], "code": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
