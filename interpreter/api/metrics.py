"""``GET /metrics``: Prometheus text, or the reference server's JSON for ``Accept: application/json``.

Needs a key unless METRICS_AUTH_ENABLED=false.
"""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, jsonify, request

from interpreter.api.app import current_deps
from interpreter.api.openapi import documented

blueprint = Blueprint("metrics", __name__)
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@blueprint.get("/metrics")
@documented("Metrics: Prometheus text, or JSON for Accept: application/json", tag="health")
async def metrics() -> Response:
    deps = current_deps()
    if "application/json" in request.headers.get("accept", ""):
        return jsonify(reference_json())
    return Response(deps.metrics.render(), status=200, content_type=PROMETHEUS)


def reference_json() -> dict[str, Any]:
    """The reference server's JSON metrics, from the same counters."""
    deps = current_deps()
    runs = deps.metrics.runs.values
    by_status: dict[str, float] = {}
    by_language: dict[str, float] = {}
    for labels, count in runs.items():
        named = dict(labels)
        by_status[named["status"]] = by_status.get(named["status"], 0) + count
        by_language[named["language"]] = by_language.get(named["language"], 0) + count
    requests: dict[str, float] = {}
    for labels, count in deps.metrics.requests.values.items():
        status = dict(labels)["status"]
        requests[status] = requests.get(status, 0) + count
    gauges = {gauge.name: sum(gauge.read().values()) for gauge in deps.metrics.gauges}
    return {
        "execution_statistics": {
            "total_executions": sum(by_status.values()),
            "successful_executions": by_status.get("ok", 0),
            "failed_executions": sum(v for k, v in by_status.items() if k != "ok"),
            "timeout_executions": by_status.get("timeout", 0),
            "by_status": by_status,
            "by_language": by_language,
        },
        "api_statistics": {"total_requests": sum(requests.values()), "by_status": requests},
        "system_metrics": {
            "counters": {
                "store_errors": sum(deps.metrics.store_errors.values.values()),
                "rate_limited": sum(deps.metrics.rate_limited.values.values()),
                "auth_failures": sum(deps.metrics.auth_failures.values.values()),
            },
            "gauges": gauges,
            "buffer_size": 0,
            "uptime_seconds": round(time.monotonic() - deps.started_at, 1),
        },
    }
