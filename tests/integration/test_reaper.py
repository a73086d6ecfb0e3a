"""Nothing left behind: the instance lock, and a crashed server's jails cleaned up by its successor."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
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


@pytest.mark.parametrize(
    ("second_env", "message"),
    [
        ({}, "SANDBOX_BASE_DIR: another instance"),  # the same base dir (and data dir)
        ({"SANDBOX_BASE_DIR": "other-sandboxes"}, "DATA_DIR: another instance"),  # only the data dir shared
    ],
)
def test_second_instance_on_the_same_dirs_refuses_to_start(
    base: Path, second_env: dict[str, str], message: str
) -> None:
    first = ServerProcess(base)
    first.start()
    try:
        second = ServerProcess(base, **{key: str(base / value) for key, value in second_env.items()})
        result = subprocess.run([sys.executable, "-m", "interpreter", "serve"], env=second.env, cwd=base,
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert result.returncode == 2
        assert message in result.stderr
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
        # Drains for SHUTDOWN_GRACE_SECONDS (5 s here), then cancels the run: stop() would time out
        # (and not return 0) if the server waited for the 120 s program.
        assert server.stop() == 0
    assert server.leftovers() == {"run_dirs": [], "cgroups": [], "processes": []}
