"""Real store servers for the store tests (DESIGN §4, §10): one redis-server and one moto_server per session.

Both bind 127.0.0.1 on free ports. A missing binary skips the tests that need it, except under
``CI=true``, where it fails them. ``redis_kv`` and ``s3_blobs`` open an adapter on those servers inside
a trio-asyncio loop of the test's own trio run, on a key namespace or bucket of their own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio
from aiobotocore.session import get_session

from interpreter.settings import load_settings
from interpreter.stores.blobs_s3 import S3Blobs, S3Config, open_s3_blobs
from interpreter.stores.kv_redis import RedisConfig, RedisKV, open_redis_kv
from interpreter.stores.kv_sqlite import open_sqlite_kv
from interpreter.stores.protocols import KV
from tests.conftest import free_port, open_dir

REDIS_SERVER = "/usr/bin/redis-server"
DEFAULT_MOTO_SERVER = "/opt/interpreter/moto-venv/bin/moto_server"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CLEANUP_S = 10.0
# moto accepts any credentials; these only have to be present.
S3_ACCESS_KEY = "test-access-key"
S3_SECRET_KEY = "test-secret-key"


def need_binary(path: str, what: str) -> None:
    """Skip when ``path`` is not an executable; under CI=true that is a failure (DESIGN §10)."""
    if os.access(path, os.X_OK):
        return
    message = f"{what} is not installed at {path}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the store tests must run)")
    pytest.skip(message)


class StoreServer:
    """A server process on a free loopback port, in a 0755 directory of its own, logging to a file there."""

    def __init__(self, name: str, argv: Callable[[int], list[str]], ready: Callable[[int], bool]) -> None:
        self.name = name
        self.dir = open_dir(f"interp-{name}-")
        self.log_path = self.dir / f"{name}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._argv = argv
        self._ready = ready

    def start(self, port: int | None = None) -> None:
        """On ``port`` (a restart on the same address), else on a free one."""
        # A free port can be taken between the probe and the bind: try a few.
        for _ in range(5):
            self.port = port or free_port()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self._argv(self.port), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._ready(self.port):
                    return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path.exists() else ""


def redis_answers(port: int, password: str | None = None) -> bool:
    """True when a Redis server on ``port`` answers PING (after AUTH, when given a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            if password is not None:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_server(*extra: str, password: str | None = None) -> StoreServer:
    """A redis-server that keeps nothing on disk; not started yet."""

    def argv(port: int) -> list[str]:
        args = [REDIS_SERVER, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
        return [*args, *(["--requirepass", password] if password else []), *extra]

    return StoreServer("redis", argv, lambda port: redis_answers(port, password))


def moto_answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
    except httpx.TransportError:
        return False
    return True


@pytest.fixture
def bases() -> Iterator[tuple[Path, Path]]:
    """Two server base directories (two nodes of one deployment), removed afterwards."""
    paths = (open_dir("interp-node-a-"), open_dir("interp-node-b-"))
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the session: ``redis://127.0.0.1:<port>/0``."""
    need_binary(REDIS_SERVER, "redis-server")
    server = redis_server()
    try:
        server.start()
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real moto_server for the session (from MOTO_SERVER_BIN): ``127.0.0.1:<port>``, no scheme, as S3_ENDPOINT."""
    binary = os.environ.get("MOTO_SERVER_BIN", DEFAULT_MOTO_SERVER)
    need_binary(binary, "moto_server")
    server = StoreServer("moto", lambda port: [binary, "-H", "127.0.0.1", "-p", str(port)], moto_answers)
    try:
        server.start()
        yield f"127.0.0.1:{server.port}"
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "redis"])
async def kv(request: pytest.FixtureRequest, work_dir: Path) -> AsyncIterator[KV]:
    """Each KV adapter in turn: SQLite in the test's directory, Redis in a key namespace of its own."""
    if request.param == "sqlite":
        async with open_sqlite_kv(work_dir / "kv.sqlite3") as store:
            yield store
        return
    settings = load_settings({"REDIS_URL": request.getfixturevalue("redis_url")}, env_file=None)
    config = replace(RedisConfig.from_settings(settings), namespace=f"kv-{secrets.token_hex(6)}:")
    async with trio_asyncio.open_loop(), open_redis_kv(config) as redis:
        yield redis


@pytest.fixture
async def redis_kv(redis_url: str) -> AsyncIterator[RedisKV]:
    """An open RedisKV on the session's server, in a key namespace of its own that is emptied afterwards."""
    settings = load_settings({"REDIS_URL": redis_url}, env_file=None)
    config = replace(RedisConfig.from_settings(settings), namespace=f"test-{secrets.token_hex(6)}:")
    async with trio_asyncio.open_loop():
        try:
            async with open_redis_kv(config) as store:
                yield store
        finally:
            # A second client: the test may have closed the first.
            with trio.move_on_after(CLEANUP_S, shield=True):
                async with open_redis_kv(config) as cleaner:
                    for key in await cleaner.keys(""):
                        await cleaner.delete(key)


def s3_config(endpoint: str, *, bucket: str | None = None, region: str = "us-east-1", **changes: Any) -> S3Config:
    """S3Config as S3_* settings give it, on a fresh random bucket unless one is named."""
    settings = load_settings(
        {
            "S3_ENDPOINT": endpoint,
            "S3_BUCKET": bucket or f"test-{secrets.token_hex(6)}",
            "S3_REGION": region,
            "S3_ACCESS_KEY": S3_ACCESS_KEY,
            "S3_SECRET_KEY": S3_SECRET_KEY,
        },
        env_file=None,
    )
    return replace(S3Config.from_settings(settings), **changes)


class RawS3:
    """A plain aiobotocore client for assertions the adapter does not expose; ``await raw("op", **kw)``."""

    def __init__(self, client: Any, loop: Any) -> None:
        self._client = client
        self._loop = loop

    async def __call__(self, operation: str, **kwargs: Any) -> Any:
        with trio.fail_after(30):
            return await trio_asyncio.aio_as_trio(getattr(self._client, operation), loop=self._loop)(**kwargs)

    async def empty_bucket(self, bucket: str) -> None:
        """Delete every object and pending multipart upload of ``bucket``, then the bucket."""
        uploads = await self("list_multipart_uploads", Bucket=bucket)
        for upload in uploads.get("Uploads", []):
            await self("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        while True:
            page = await self("list_objects_v2", Bucket=bucket)
            for item in page.get("Contents", []):
                await self("delete_object", Bucket=bucket, Key=item["Key"])
            if not page.get("IsTruncated"):
                break
        await self("delete_bucket", Bucket=bucket)


@asynccontextmanager
async def open_raw_s3(endpoint: str, region: str = "us-east-1") -> AsyncIterator[RawS3]:
    """A RawS3 on ``endpoint``; needs a running trio-asyncio loop."""
    loop = trio_asyncio.current_loop.get()
    creator = get_session().create_client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        region_name=region,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )
    client = await trio_asyncio.aio_as_trio(creator.__aenter__, loop=loop)()
    try:
        yield RawS3(client, loop)
    finally:
        with trio.move_on_after(CLEANUP_S, shield=True):
            await trio_asyncio.aio_as_trio(creator.__aexit__, loop=loop)(None, None, None)


@pytest.fixture
async def s3_blobs(s3_endpoint: str) -> AsyncIterator[S3Blobs]:
    """An open S3Blobs on the session's moto_server, on a fresh bucket that is deleted afterwards."""
    config = s3_config(s3_endpoint)
    async with trio_asyncio.open_loop():
        try:
            async with open_s3_blobs(config) as store:
                yield store
        finally:
            # Best effort (the bucket may never have been created): it only frees moto's memory.
            with trio.move_on_after(CLEANUP_S, shield=True), suppress(Exception):
                async with open_raw_s3(s3_endpoint) as raw:
                    await raw.empty_bucket(config.bucket)
