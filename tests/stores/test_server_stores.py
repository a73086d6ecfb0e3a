"""The server on Redis + S3: chosen because the variables were given, visible in health, and a store
that goes down makes /health/detailed say so while the rest keeps answering."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, open_dir
from tests.stores.conftest import StoreServer, redis_server


@pytest.fixture
def base() -> Iterator[Path]:
    path = open_dir("interp-stores-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def detailed(server: ServerProcess) -> httpx.Response:
    return httpx.get(f"{server.url}/health/detailed", headers=server.headers, timeout=15)


def test_redis_and_s3_are_used_when_given(base: Path, redis_url: str, s3_endpoint: str) -> None:
    server = ServerProcess(base, REDIS_URL=redis_url, S3_ENDPOINT=s3_endpoint, S3_REGION="us-east-1",
                           S3_BUCKET=f"server-{secrets.token_hex(6)}")  # fmt: skip
    server.start()
    try:
        services = detailed(server).json()["services"]
        assert services["kv"] == services["kv"] | {"status": "healthy", "details": {"backend": "redis"}}
        assert services["blobs"] == services["blobs"] | {"status": "healthy", "details": {"backend": "s3"}}
        assert not (base / "data" / "kv.sqlite3").exists()  # nothing embedded was opened
    finally:
        assert server.stop() == 0
    started = next(line for line in server.log_lines() if line["msg"] == "starting")
    assert (started["kv"], started["blobs"]) == ("redis", "s3")


def test_a_store_that_goes_down_shows_in_health_and_the_server_recovers(base: Path) -> None:
    store: StoreServer = redis_server()
    store.start()
    try:
        server = ServerProcess(base, REDIS_URL=f"redis://127.0.0.1:{store.port}/0")
        server.start()
        try:
            assert detailed(server).status_code == 200
            store.stop()
            down = detailed(server)
            assert down.status_code == 503
            kv = down.json()["services"]["kv"]
            assert kv["status"] == "unhealthy"
            assert "127.0.0.1" not in kv["error"]  # no host details for the client
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
            store.start(port=store.port)  # back on the same address
            statuses = []
            for _ in range(10):  # recovered by itself: at most a stale pooled connection fails first
                response = detailed(server)
                statuses.append((response.status_code, response.json()["services"]["kv"].get("error")))
                if response.status_code == 200:
                    break
                time.sleep(0.5)
            assert statuses[-1][0] == 200, statuses
        finally:
            assert server.stop() == 0
    finally:
        store.close()
