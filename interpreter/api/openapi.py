"""The OpenAPI document, generated from the routes' pydantic models, and the docs page.

A route describes itself with ``@documented(...)``; ``/openapi.json`` walks the URL map. The docs
page and its script are files inside the package (and so inside the binary): no CDN.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from quart import Blueprint, Response, current_app, send_from_directory

from interpreter import __version__
from interpreter.api.models import ErrorEnvelope
from interpreter.resources import static_dir

F = TypeVar("F", bound=Callable[..., Any])
REF = "#/components/schemas/{model}"
AUTH_STATUSES = {401: "Missing or invalid credentials"}


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    tag: str
    response: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    auth: bool = True
    errors: dict[int, str] = field(default_factory=dict)
    description: str = ""


def documented(
    summary: str,
    *,
    tag: str,
    response: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    auth: bool = True,
    errors: dict[int, str] | None = None,
    description: str = "",
) -> Callable[[F], F]:
    def mark(view: F) -> F:
        view.__openapi__ = RouteDoc(summary, tag, response, body, auth, errors or {}, description)  # type: ignore[attr-defined]
        return view

    return mark


def _schema_ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF, mode="serialization")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def build_openapi() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    error_ref = _schema_ref(ErrorEnvelope, schemas)
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        doc: RouteDoc | None = getattr(current_app.view_functions.get(rule.endpoint), "__openapi__", None)
        if doc is None:
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            responses: dict[str, Any] = {"200": {"description": "OK"}}
            if doc.response is not None:
                responses["200"]["content"] = {"application/json": {"schema": _schema_ref(doc.response, schemas)}}
            for status, why in {**(AUTH_STATUSES if doc.auth else {}), **doc.errors}.items():
                responses[str(status)] = {"description": why, "content": {"application/json": {"schema": error_ref}}}
            operation: dict[str, Any] = {
                "summary": doc.summary,
                "tags": [doc.tag],
                "responses": responses,
                "operationId": f"{method.lower()}_{rule.endpoint.replace('.', '_')}",
            }
            if doc.description:
                operation["description"] = doc.description
            if params:
                operation["parameters"] = params
            if doc.body is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _schema_ref(doc.body, schemas)}},
                }
            operation["security"] = [{"ApiKeyHeader": []}, {"BasicKey": []}] if doc.auth else []
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Code Interpreter API",
            "version": __version__,
            "description": "Sandboxed code execution for LLM agents. Every route except /api/v1/admin/... "
            "also answers under /v1.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "BasicKey": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The API key as the username, empty password",
                },
            },
        },
    }


blueprint = Blueprint("docs", __name__)


@blueprint.get("/openapi.json")
async def openapi_json() -> dict[str, Any]:
    return build_openapi()


@blueprint.get("/docs")
async def docs_page() -> Response:
    return await send_from_directory(static_dir(), "docs.html")


@blueprint.get("/docs/<any('docs.js', 'docs.css'):name>")
async def docs_asset(name: str) -> Response:
    return await send_from_directory(static_dir(), name)
