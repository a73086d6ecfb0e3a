"""Nothing left behind: the instance lock, and a crashed server's jails cleaned up by its successor."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, open_dir

pytestmark = pytest.mark.nsjail


@pytest.fixture
def base() -> Iterator[Path]:
    path = open_dir("interp-reaper-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_second_instance_on_the_same_base_dir_refuses_to_start(base: Path) -> None:
    first = ServerProcess(base)
    first.start()
    try:
        second = ServerProcess(base)
        result = subprocess.run([sys.executable, "-m", "interpreter", "serve"], env=second.env, cwd=base,
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert result.returncode == 2
        assert "another instance" in result.stderr
        assert first.healthy()
    finally:
        assert first.stop() == 0


def test_second_instance_on_the_same_data_dir_refuses_to_start(base: Path) -> None:
    first = ServerProcess(base)
    first.start()
    try:
        second = ServerProcess(base, SANDBOX_BASE_DIR=str(base / "other-sandboxes"))  # same DATA_DIR
        result = subprocess.run([sys.executable, "-m", "interpreter", "serve"], env=second.env, cwd=base,
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert result.returncode == 2
        assert "DATA_DIR" in result.stderr
        assert first.healthy()
    finally:
        assert first.stop() == 0


def test_successor_reaps_a_crashed_servers_jails(base: Path) -> None:
    crashed = ServerProcess(base)
    crashed.start()
    with httpx.stream("POST", f"{crashed.url}/exec", json={"code": "sleep 120", "lang": "bash"},
                      headers=crashed.headers, timeout=30) as response:  # fmt: skip
        chunks = response.iter_raw()  # held: dropping the iterator would hang up and cancel the run
        assert next(chunks) == b" "  # the jail is running
        assert crashed.proc is not None
        crashed.proc.send_signal(signal.SIGKILL)  # no cleanup of any kind
        crashed.proc.wait(timeout=10)
    left = crashed.leftovers()
    assert left["run_dirs"]  # the jail outlived its server: its run dir, cgroups and processes remain
    assert left["cgroups"]
    assert left["processes"]

    successor = ServerProcess(base)
    successor.uid = crashed.uid  # same settings, as a restart by systemd would have
    successor.env["SANDBOX_UID"] = str(crashed.uid)
    successor.start()
    try:
        assert successor.wait_clean(timeout_s=10) == {"run_dirs": [], "cgroups": [], "processes": []}
        assert successor.exec("echo fine", "bash")["stdout"] == "fine\n"
    finally:
        assert successor.stop() == 0


def test_graceful_stop_leaves_nothing_behind(base: Path) -> None:
    server = ServerProcess(base)
    server.start()
    with httpx.stream("POST", f"{server.url}/exec", json={"code": "sleep 120", "lang": "bash"},
                      headers=server.headers, timeout=30) as response:  # fmt: skip
        chunks = response.iter_raw()  # held: the request stays in flight through the shutdown
        assert next(chunks) == b" "
        started = time.monotonic()
        assert server.stop() == 0  # drains for SHUTDOWN_GRACE_SECONDS (5 s here), then cancels the run
    assert time.monotonic() - started < 15
    assert server.leftovers() == {"run_dirs": [], "cgroups": [], "processes": []}
