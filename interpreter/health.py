"""Health checks: each component registers its own; /health/detailed runs them all at once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

Status = Literal["healthy", "degraded", "unhealthy"]
CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CheckResult:
    status: Status
    details: dict[str, Any] | None = None
    error: str | None = None  # for the client: never a path or a secret


Check = Callable[[], Awaitable[CheckResult]]


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


class HealthRegistry:
    """Named checks. A ``required`` check that is unhealthy makes the whole service unhealthy (503)."""

    def __init__(self) -> None:
        self._checks: dict[str, tuple[Check, bool]] = {}

    def register(self, name: str, check: Check, *, required: bool = True) -> None:
        self._checks[name] = (check, required)

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    async def _run_one(self, name: str, check: Check, out: dict[str, dict[str, Any]]) -> None:
        started = trio.current_time()
        with trio.move_on_after(CHECK_TIMEOUT_S) as scope:
            try:
                result = await check()
            except Exception as exc:  # noqa: BLE001 - a failing check is a result, not a crash
                result = CheckResult("unhealthy", error=f"check failed: {type(exc).__name__}")
        if scope.cancelled_caught:
            result = CheckResult("unhealthy", error=f"check timed out after {CHECK_TIMEOUT_S:g} s")
        entry: dict[str, Any] = {
            "service": name,
            "status": result.status,
            "timestamp": _now_iso(),
            "response_time_ms": round((trio.current_time() - started) * 1000, 2),
        }
        if result.details is not None:
            entry["details"] = result.details
        if result.error is not None:
            entry["error"] = result.error
        out[name] = entry

    async def report(self) -> dict[str, Any]:
        """The reference's ``{status, timestamp, services, summary}`` document."""
        services: dict[str, dict[str, Any]] = {}
        async with trio.open_nursery() as nursery:
            for name, (check, _) in self._checks.items():
                nursery.start_soon(self._run_one, name, check, services)
        services = {name: services[name] for name in self._checks}  # stable order
        statuses = [entry["status"] for entry in services.values()]
        required_down = any(
            services[name]["status"] == "unhealthy" for name, (_, required) in self._checks.items() if required
        )
        overall: Status
        if required_down:
            overall = "unhealthy"
        elif any(status != "healthy" for status in statuses):
            overall = "degraded"
        else:
            overall = "healthy"
        return {
            "status": overall,
            "timestamp": _now_iso(),
            "services": services,
            "summary": {
                "total_services": len(statuses),
                "healthy_services": statuses.count("healthy"),
                "degraded_services": statuses.count("degraded"),
                "unhealthy_services": statuses.count("unhealthy"),
            },
        }
