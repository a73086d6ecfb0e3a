"""Start, drain and stop: in-flight requests finish, new ones are refused, systemd hears about it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from quart import Blueprint, request

from interpreter.main import serve
from supervisors.sd_notify import Notifier
from tests.conftest import KEY_HEADERS, TEST_KEY, cli_env, free_port, make_settings

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
    settings = make_settings(work_dir, SHUTDOWN_GRACE_SECONDS="10")
    stop = trio.Event()
    in_flight: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(
            partial(serve, settings, shutdown_trigger=stop.wait, notifier=Notifier({}), blueprints=(slow,))
        )
        nursery.start_soon(_get, f"{url}/probe/sleep?s=1.5", in_flight)
        await trio.sleep(0.5)  # the request is being handled
        stop.set()
        await trio.sleep(0.2)
        host, port = url.removeprefix("http://").split(":")
        with pytest.raises(OSError, match="connect"):  # the listener is closed while the old request drains
            await trio.open_tcp_stream(host, int(port))
    # serve() returned only after the in-flight request completed normally.
    assert in_flight == {"status": 200, "body": {"slept": 1.5}}


async def test_drain_is_bounded_by_the_grace_period(work_dir: Path) -> None:
    settings = make_settings(work_dir, SHUTDOWN_GRACE_SECONDS="1")
    stop = trio.Event()
    in_flight: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(
            partial(serve, settings, shutdown_trigger=stop.wait, notifier=Notifier({}), blueprints=(slow,))
        )
        nursery.start_soon(_get, f"{url}/probe/sleep?s=60", in_flight)
        await trio.sleep(0.3)
        started = trio.current_time()
        stop.set()
    assert trio.current_time() - started < 5  # cut after ~1 s, not 60
    assert "error" in in_flight


def _notify_socket(tmp: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp / "notify"))
    sock.settimeout(30)
    return sock


def _wait_health(port: int, proc: subprocess.Popen[str], scheme: str = "http", **kwargs: object) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(f"{scheme}://127.0.0.1:{port}/health", timeout=2, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_real_sigterm_with_systemd_notifications(work_dir: Path) -> None:
    port = free_port()
    sock = _notify_socket(work_dir)
    env = cli_env(
        PORT=str(port),
        API_HOST="127.0.0.1",
        API_KEY=TEST_KEY,
        SANDBOX_BASE_DIR=str(work_dir / "sb"),
        DATA_DIR=str(work_dir / "data"),
        NOTIFY_SOCKET=str(work_dir / "notify"),
        WATCHDOG_USEC="1000000",
        LOG_FORMAT="json",
    )
    log_path = work_dir / "stderr.log"
    with (
        log_path.open("w") as log_file,
        subprocess.Popen(
            [sys.executable, "-m", "interpreter", "serve"],
            env=env,
            cwd=work_dir,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
        ) as proc,
    ):
        try:
            _run_sigterm_checks(proc, sock, port)
        finally:
            if proc.poll() is None:
                proc.kill()
            sock.close()
    stderr = log_path.read_text()
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages_logged = [line["msg"] for line in lines]
    assert "shutdown requested" in messages_logged
    assert messages_logged[-1] == "stopped"
    assert TEST_KEY not in stderr


def _run_sigterm_checks(proc: subprocess.Popen[str], sock: socket.socket, port: int) -> None:
    assert sock.recv(100).decode() == "READY=1"  # the first message, sent once listening
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200  # so this answers at once
    pings = [sock.recv(100).decode() for _ in range(2)]  # the watchdog pings every 0.5 s
    assert pings == ["WATCHDOG=1", "WATCHDOG=1"]
    proc.send_signal(signal.SIGTERM)
    while (message := sock.recv(100).decode()) == "WATCHDOG=1":
        pass
    assert message == "STOPPING=1"
    assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_sigint_also_stops_gracefully(work_dir: Path) -> None:
    port = free_port()
    env = cli_env(
        PORT=str(port),
        API_HOST="127.0.0.1",
        API_KEY=TEST_KEY,
        SANDBOX_BASE_DIR=str(work_dir / "sb"),
        DATA_DIR=str(work_dir / "data"),
    )
    with subprocess.Popen(
        [sys.executable, "-m", "interpreter", "serve"],
        env=env,
        cwd=work_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            _wait_health(port, proc)
            os.kill(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
