"""Start, drain and stop: in-flight requests finish, new ones are refused, systemd hears about it."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest
import trio
from quart import Blueprint, request

from tests.conftest import KEY_HEADERS, TEST_KEY, ServerProcess, make_settings, running_server

slow = Blueprint("slow", __name__)


@slow.get("/probe/sleep")
async def sleep_route() -> dict[str, float]:
    seconds = float(request.args.get("s", "1"))
    await trio.sleep(seconds)
    return {"slept": seconds}


async def _get(url: str, out: dict[str, object]) -> None:
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(url, headers=KEY_HEADERS)
            out["status"], out["body"] = response.status_code, response.json()
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__


async def test_shutdown_drains_in_flight_requests_and_refuses_new_ones(work_dir: Path) -> None:
    in_flight: dict[str, object] = {}
    settings = make_settings(work_dir, SHUTDOWN_GRACE_SECONDS="10")
    async with running_server(settings, blueprints=(slow,)) as (url, stop), trio.open_nursery() as requests:
        requests.start_soon(_get, f"{url}/probe/sleep?s=1.5", in_flight)
        await trio.sleep(0.5)  # the request is being handled
        stop.set()
        await trio.sleep(0.2)
        host, port = url.removeprefix("http://").split(":")
        with pytest.raises(OSError, match="connect"):  # the listener is closed while the old request drains
            await trio.open_tcp_stream(host, int(port))
    # The request finished normally although the shutdown began in the middle of it.
    assert in_flight == {"status": 200, "body": {"slept": 1.5}}


async def test_drain_is_bounded_by_the_grace_period(work_dir: Path) -> None:
    in_flight: dict[str, object] = {}
    settings = make_settings(work_dir, SHUTDOWN_GRACE_SECONDS="1")
    async with running_server(settings, blueprints=(slow,)) as (url, stop), trio.open_nursery() as requests:
        requests.start_soon(_get, f"{url}/probe/sleep?s=60", in_flight)
        await trio.sleep(0.3)
        stop.set()
    # Cut at the deadline: a server that waited would have answered 200 after 60 s.
    assert "error" in in_flight


def _notify_socket(tmp: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp / "notify"))
    sock.settimeout(30)
    return sock


@pytest.mark.slow
def test_real_sigterm_with_systemd_notifications(work_dir: Path) -> None:
    sock = _notify_socket(work_dir)
    server = ServerProcess(work_dir, NOTIFY_SOCKET=str(work_dir / "notify"), WATCHDOG_USEC="1000000")
    try:
        server.start()
        assert sock.recv(100).decode() == "READY=1"  # the first message, sent once listening
        pings = [sock.recv(100).decode() for _ in range(2)]  # the watchdog pings every 0.5 s
        assert pings == ["WATCHDOG=1", "WATCHDOG=1"]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        while (message := sock.recv(100).decode()) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1"
        assert server.proc.wait(timeout=30) == 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
        sock.close()
    messages_logged = [line["msg"] for line in server.log_lines()]
    assert "shutdown requested" in messages_logged
    assert messages_logged[-1] == "stopped"
    assert TEST_KEY not in server.log_path.read_text()


@pytest.mark.slow
def test_sigint_also_stops_gracefully(work_dir: Path) -> None:
    server = ServerProcess(work_dir)
    server.start()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGINT)
    assert server.proc.wait(timeout=30) == 0
