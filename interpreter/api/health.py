"""Liveness, the detailed health document, and the debug-only effective configuration."""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, current_app, jsonify

from interpreter import __version__
from interpreter.api.app import AppDeps
from interpreter.api.models import DetailedHealth, Health
from interpreter.api.openapi import documented
from interpreter.errors import NotFound

blueprint = Blueprint("health", __name__)


def _deps() -> AppDeps:
    deps: AppDeps = current_app.extensions["deps"]
    return deps


@blueprint.get("/health")
@documented("Liveness: the process answers", tag="health", response=Health, auth=False)
async def health() -> dict[str, Any]:
    return Health(
        status="healthy", version=__version__, uptime_seconds=round(time.monotonic() - _deps().started_at, 3)
    ).model_dump()


@blueprint.get("/health/detailed")
@documented(
    "Every component's health; 503 when a required one is down",
    tag="health",
    response=DetailedHealth,
    errors={503: "A required component is unhealthy (health shape, not the envelope)"},
)
async def health_detailed() -> Response:
    report = await _deps().health.report()
    response = jsonify(report)
    if report["status"] == "unhealthy":
        response.status_code = 503
    elif report["status"] == "degraded":
        response.headers["X-Health-Status"] = "degraded"
    return response


@blueprint.get("/config")
@documented(
    "Effective settings, secrets redacted (only with API_DEBUG)", tag="health", errors={404: "API_DEBUG is off"}
)
async def config() -> dict[str, Any]:
    settings = _deps().settings
    if not settings.api_debug:
        raise NotFound()
    return {
        "debug": True,
        "version": __version__,
        "languages": sorted(_deps().languages),
        "settings": settings.redacted(),
    }
