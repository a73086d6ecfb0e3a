"""sd_notify against a fake NOTIFY_SOCKET: datagrams, abstract sockets, watchdog pacing."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisors.sd_notify import Notifier, run_watchdog


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.notify("READY=1")  # a no-op, no error


def test_messages_reach_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.notify("READY=1")
    notifier.notify("STOPPING=1")
    assert received(sock) == ["READY=1", "STOPPING=1"]


def test_abstract_socket_address() -> None:
    name = f"interp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_a_gone_socket_is_not_fatal(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")}).notify("READY=1")


def test_watchdog_period_parsing() -> None:
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}).watchdog_s == 4.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_s == 4.0


async def test_watchdog_pings_at_half_the_period_while_healthy(
    notify_socket: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    healthy = True
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_watchdog, notifier, lambda: healthy))
        await trio.sleep(5.5)  # pings at t = 1, 2, 3, 4, 5
        assert received(sock) == ["WATCHDOG=1"] * 5
        healthy = False
        await trio.sleep(3)  # unhealthy: no pings, so systemd would restart us
        assert received(sock) == []
        nursery.cancel_scope.cancel()
