"""Shared fixtures: settings for tests, an in-process server, free ports, 0755 directories."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
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
