"""The session cleanup service: the files of expired sessions, and blobs nobody knows of.

Sessions expire in the KV store by themselves (SESSION_TTL_HOURS after their last use); their
files' bytes do not, so every SESSION_CLEANUP_INTERVAL_MINUTES this service asks the catalog to
remove them, and with ENABLE_ORPHAN_S3_CLEANUP also blobs that have no metadata (a crash between
a blob and its metadata, a session record lost from Redis).
"""

from __future__ import annotations

import logging
from typing import NoReturn, Protocol

import trio

log = logging.getLogger("interpreter.cleanup")


class Sweeper(Protocol):
    async def sweep(self, *, orphans: bool) -> dict[str, int]: ...


async def run(
    sweeper: Sweeper,
    interval_s: float,
    orphans: bool,
    store_errors: tuple[type[Exception], ...],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Ready at once; the first pass runs right away. A store that is down only postpones a pass."""
    task_status.started()
    while True:
        try:
            removed = await sweeper.sweep(orphans=orphans)
        except store_errors as exc:
            log.warning("session cleanup postponed: storage unavailable", extra={"fields": {"error": str(exc)}})
        else:
            if any(removed.values()):
                log.info("expired session files removed", extra={"fields": removed})
        await trio.sleep(interval_s)
