"""Shared fixtures: settings for tests, an in-process server, free ports, 0755 directories."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from quart import Blueprint

from interpreter.main import serve
from interpreter.settings import Settings, load_settings
from supervisors.sd_notify import Notifier

TEST_KEY = "test-key-" + secrets.token_hex(12)
REPO = Path(__file__).resolve().parent.parent


def open_dir(prefix: str = "interp-test-") -> Path:
    """A 0755 temporary directory (pytest's tmp_path is 0700, which nsjail bind sources cannot use)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = open_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def other_dir() -> Iterator[Path]:
    path = open_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(base: Path, **env: str) -> Settings:
    """Settings as the CLI would build them from exactly ``env`` (no process environment, no .env)."""
    environ = {
        "API_HOST": "127.0.0.1",
        "PORT": "0",
        "API_KEY": TEST_KEY,
        "SANDBOX_BASE_DIR": str(base / "sandboxes"),
        "DATA_DIR": str(base / "data"),
        "SSL_CERTS_PATH": str(base / "ssl"),
        "SHUTDOWN_GRACE_SECONDS": "5",
        "SANDBOX_POOL_WARMUP_ON_STARTUP": "false",  # DESIGN §10: no warm-up unless a test is about the pool
        **env,
    }
    return load_settings(environ, env_file=None)


def cli_env(**env: str) -> dict[str, str]:
    """A process environment for the CLI: this machine's PATH, minus variables that collide with ours.

    The host exports SSL_CERT_FILE (OpenSSL's CA bundle), which is also the guide's certificate variable.
    """
    base = {k: v for k, v in os.environ.items() if k not in {"SSL_CERT_FILE", "SSL_KEY_FILE"}}
    return {**base, **env}


@asynccontextmanager
async def running_server(
    settings: Settings, *, blueprints: tuple[Blueprint, ...] = (), notifier: Notifier | None = None
) -> AsyncIterator[tuple[str, trio.Event]]:
    """Serve in-process; yields (base URL, shutdown event). Leaving the block shuts down gracefully."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                serve, settings, shutdown_trigger=stop.wait, notifier=notifier or Notifier({}), blueprints=blueprints
            )
        )
        try:
            yield binds[0], stop
        finally:
            stop.set()


@asynccontextmanager
async def client(base_url: str, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30, **kwargs) as http:
        yield http


KEY_HEADERS = {"x-api-key": TEST_KEY}


def _userns_available() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    """nsjail tests skip where user namespaces are missing; under CI=true such a skip is a failure."""
    if item.get_closest_marker("nsjail") and not _userns_available():
        if os.environ.get("CI") == "true":
            pytest.fail("nsjail test cannot run: user namespaces are unavailable on this CI machine")
        pytest.skip("user namespaces are unavailable")


class ServerProcess:
    """A real ``interpreter serve`` process, shared by the tests of a module (DESIGN §10)."""

    def __init__(self, base: Path, command: list[str] | None = None, **env: str) -> None:
        self.base = base
        self.command = command or [sys.executable, "-m", "interpreter", "serve"]
        self.key = TEST_KEY
        self.port = free_port()
        # A uid range of its own, so a test can tell this server's sandbox processes from any other's.
        self.uid = 30000 + secrets.randbelow(20000)
        defaults = {
            "PORT": str(self.port), "API_HOST": "127.0.0.1", "API_KEY": self.key,
            "SANDBOX_BASE_DIR": str(base / "sandboxes"), "DATA_DIR": str(base / "data"), "SANDBOX_UID": str(self.uid),
            "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "LOG_FILE": str(self.log_path), "SHUTDOWN_GRACE_SECONDS": "5",
            "SANDBOX_POOL_WARMUP_ON_STARTUP": "false",  # DESIGN §10: no warm-up unless a test is about the pool
        }  # fmt: skip
        self.env = cli_env(**{**defaults, **env})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=2).raise_for_status()
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:]) if self.log_path.exists() else ""

    def exec(self, code: str, lang: str, timeout_s: float = 120, key: str | None = None,
             **fields: object) -> dict[str, Any]:  # fmt: skip
        """POST /exec (with ``key``, else the test key) and return the JSON (keepalive whitespace is part of a
        valid JSON body)."""
        headers = {"x-api-key": key} if key is not None else self.headers
        response = httpx.post(
            f"{self.url}/exec", json={"code": code, "lang": lang, **fields}, headers=headers, timeout=timeout_s
        )
        assert response.status_code == 200, f"{response.text}\n{self.log_tail(60)}"
        result: dict[str, Any] = response.json()
        return result

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health/detailed", headers=self.headers, timeout=10).status_code == 200

    def leftovers(self) -> dict[str, list[str]]:
        """What runs left behind: run directories, nsjail cgroups, processes of the sandbox uid."""
        runs = self.base / "sandboxes" / "runs"
        from sandboxes.host import cgroup_parent_name

        parent = cgroup_parent_name(self.base / "sandboxes")
        cgroups = [
            str(child)
            for controller in ("memory", "pids")
            if (Path("/sys/fs/cgroup") / controller / parent).is_dir()
            for child in (Path("/sys/fs/cgroup") / controller / parent).iterdir()
            if child.is_dir()
        ]
        processes = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            uid_line = next((line for line in text.splitlines() if line.startswith("Uid:")), "")
            if str(self.uid) in uid_line.split()[1:2]:
                processes.append(status.parent.name)
        # Launchers prepared for the next runs and Python kernels (a mounted run dir and a cgroup each) are
        # not leftovers.
        prepared = set(self.prepared())
        run_dirs = [p.name for p in runs.iterdir() if p.name not in prepared] if runs.is_dir() else []
        cgroups = [c for c in cgroups if Path(c).name.removeprefix("run-") not in prepared]
        return {"run_dirs": run_dirs, "cgroups": cgroups, "processes": processes}

    def prepared(self) -> list[str]:
        """Run ids of the server's waiting launchers and running kernels; none when it is not running."""
        try:
            services = httpx.get(f"{self.url}/health/detailed", headers=self.headers, timeout=10).json()["services"]
        except httpx.TransportError:
            return []
        kernels = services.get("kernels", {}).get("details", {}).get("run_ids", [])
        return [*services["sandbox"]["details"]["prepared"], *kernels]

    def wait_clean(self, timeout_s: float = 10) -> dict[str, list[str]]:
        """Leftovers once the last run has had time to clean up (empty lists when all is well)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.leftovers()
            if not any(found.values()) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@contextmanager
def serving(prefix: str, command: list[str] | None = None, **env: str) -> Iterator[ServerProcess]:
    """A started server process in a 0755 directory of its own; stopped and removed afterwards."""
    base = open_dir(prefix)
    instance = ServerProcess(base, command, **env)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One real server per test module, with this machine's runtimes and nsjail."""
    with serving("interp-server-", MAX_EXECUTION_TIME="20", SANDBOX_CLEANUP_INTERVAL_MINUTES="1") as instance:
        yield instance
