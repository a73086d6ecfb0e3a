"""The state archiver: Python checkpoints idle for STATE_ARCHIVE_AFTER_SECONDS move to the blob store,
and archives older than STATE_ARCHIVE_TTL_DAYS go, every STATE_ARCHIVE_CHECK_INTERVAL_SECONDS."""

from __future__ import annotations

import logging
from typing import NoReturn, Protocol

import trio

log = logging.getLogger("interpreter.state")


class Archiver(Protocol):
    async def archive_idle(self) -> dict[str, int]: ...


async def run(
    archiver: Archiver,
    interval_s: float,
    store_errors: tuple[type[Exception], ...],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Ready at once; a store that is down only postpones a pass."""
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        try:
            moved = await archiver.archive_idle()
        except store_errors as exc:
            log.warning("state archival postponed: storage unavailable", extra={"fields": {"error": str(exc)}})
        else:
            if any(moved.values()):
                log.info("python state archived", extra={"fields": moved})
