"""One supervision policy: fail fast before ready, heal with capped backoff after (STYLE §2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import trio

log = logging.getLogger("interpreter.supervisor")

ServiceState = Literal["starting", "running", "restarting"]


@dataclass(frozen=True)
class Backoff:
    first_s: float = 0.5
    max_s: float = 30.0


@dataclass
class ServiceStatus:
    state: ServiceState = "starting"
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass
class ServiceBoard:
    """What each supervised service is doing; read by /health/detailed and the watchdog."""

    services: dict[str, ServiceStatus] = field(default_factory=dict)

    def healthy(self) -> bool:
        return all(status.state == "running" for status in self.services.values())

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {name: vars(status).copy() for name, status in self.services.items()}


def _leaf_names(exc: BaseException) -> str:
    """``OSError`` rather than ``ExceptionGroup``: what actually went wrong, for health and logs."""
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(sorted({_leaf_names(inner) for inner in exc.exceptions}))
    return type(exc).__name__


async def supervise(
    service: Callable[..., Awaitable[Any]],
    *,
    name: str,
    board: ServiceBoard,
    backoff: Backoff = Backoff(),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run ``service`` (itself ``run(*, task_status)``) forever.

    Ready when the service's first ``started()`` arrives; an exception before that propagates,
    so a broken service stops the boot. Afterwards a crash (or an unexpected return) is logged and
    the service restarted after a delay that doubles up to ``backoff.max_s``. Cancellation passes
    straight through.
    """
    status = board.services.setdefault(name, ServiceStatus())
    delay, ready = backoff.first_s, False
    while True:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(service)
                status.state = "running"
                if not ready:
                    ready = True
                    task_status.started()
                delay = backoff.first_s
            raise RuntimeError("service returned")  # services never return; treat it as a crash
        except Exception as exc:
            if not ready:
                raise
            status.state, status.restarts = "restarting", status.restarts + 1
            status.last_error, status.last_error_at = _leaf_names(exc), time.time()
            log.exception("service crashed", extra={"fields": {"service": name, "retry_in_s": delay}})
        await trio.sleep(delay)
        delay = min(delay * 2, backoff.max_s)
