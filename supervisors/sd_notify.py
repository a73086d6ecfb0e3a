"""systemd notification (sd_notify) without libsystemd: READY=1, WATCHDOG=1, STOPPING=1.

The socket path comes from ``NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket); the
watchdog period from ``WATCHDOG_USEC``. Without ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn

import trio

log = logging.getLogger("interpreter.sd_notify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET") or None
        self.address: str | None = None if path is None else ("\0" + path[1:] if path.startswith("@") else path)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID, when set, names the process that must ping. In the one-file binary that is
        # PyInstaller's bootloader, our parent (the unit then needs NotifyAccess=all).
        ours = {str(os.getpid())} | ({str(os.getppid())} if getattr(sys, "frozen", False) else set())
        mine = not pid or pid in ours
        self.watchdog_s: float | None = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> None:
        """Send one datagram; failures are logged, never raised (systemd may be gone at shutdown)."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify failed", extra={"fields": {"error": exc.strerror or str(exc)}})


async def run_watchdog(
    notifier: Notifier,
    healthy: Callable[[], bool],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Ping WATCHDOG=1 every half watchdog period while ``healthy()`` holds.

    Ready at once. Without a watchdog period it just waits; an unhealthy tree skips the ping so
    that systemd restarts the service once the period runs out.
    """
    task_status.started()
    if notifier.watchdog_s is None:
        await trio.sleep_forever()
    period = notifier.watchdog_s / 2
    while True:
        # Sleep first: at start the other services are still coming up (and READY=1 is not sent yet).
        await trio.sleep(period)
        if healthy():
            notifier.notify("WATCHDOG=1")
        else:
            log.warning("watchdog ping skipped: a supervised service is not running")
