"""Opening the configured stores: Redis or SQLite, S3 or a directory, by which variables were given (DESIGN §4)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from interpreter.errors import SettingsError
from interpreter.health import Check, CheckResult, HealthRegistry
from interpreter.settings import Settings
from interpreter.stores.protocols import KV, Blobs, StoreError
from sandboxes.host import HostError, take_instance_lock

log = logging.getLogger("interpreter.stores")


@dataclass(frozen=True)
class Stores:
    kv: KV
    blobs: Blobs


def _lock_data_dir(settings: Settings) -> int:
    """The embedded store belongs to one process: an exclusive flock on <DATA_DIR>/.lock."""
    settings.data_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        return take_instance_lock(settings.data_dir / ".lock")
    except HostError as exc:
        raise SettingsError(f"DATA_DIR: {exc}") from None


@asynccontextmanager
async def open_stores(settings: Settings) -> AsyncIterator[Stores]:
    """Open both stores; the caller runs inside ``trio_asyncio.open_loop()`` (Redis and S3 need it).

    Raises:
        SettingsError: DATA_DIR is held by another instance.
        StoreError: a store cannot be opened (S3's bucket cannot be created, the database is unreadable).
    """
    embedded = settings.kv_backend == "sqlite" or settings.blob_backend == "dir"
    lock_fd = _lock_data_dir(settings) if embedded else None
    if (settings.kv_backend == "redis") != (settings.blob_backend == "s3"):
        log.warning("a mixed store pair (one embedded, one distributed) works on a single node only")
    try:
        async with open_kv(settings) as kv, _open_blobs(settings) as blobs:
            log.info("stores open", extra={"fields": {"kv": kv.backend, "blobs": blobs.backend}})
            yield Stores(kv, blobs)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


@asynccontextmanager
async def open_kv(settings: Settings) -> AsyncIterator[KV]:
    """The configured KV store alone, without the DATA_DIR lock (SQLite serialises writers itself): for
    tools that work beside a running server, like ``interpreter keys``."""
    if settings.kv_backend == "redis":
        from interpreter.stores.kv_redis import RedisConfig, open_redis_kv

        async with open_redis_kv(RedisConfig.from_settings(settings)) as redis_kv:
            yield redis_kv
    else:
        from interpreter.stores.kv_sqlite import open_sqlite_kv

        async with open_sqlite_kv(settings.data_dir / "kv.sqlite3") as sqlite_kv:
            yield sqlite_kv


@asynccontextmanager
async def _open_blobs(settings: Settings) -> AsyncIterator[Blobs]:
    if settings.blob_backend == "s3":
        from interpreter.stores.blobs_s3 import S3Config, open_s3_blobs

        async with open_s3_blobs(S3Config.from_settings(settings)) as s3_blobs:
            yield s3_blobs
    else:
        from interpreter.stores.blobs_dir import open_dir_blobs

        async with open_dir_blobs(settings.data_dir / "blobs") as dir_blobs:
            yield dir_blobs


def register_store_checks(health: HealthRegistry, stores: Stores) -> None:
    """Each store is pinged by /health/detailed; a store that is down makes the service unhealthy (503)."""

    def check(store: KV | Blobs) -> Check:
        async def ping() -> CheckResult:
            try:
                await store.ping()
            except StoreError as exc:
                return CheckResult("unhealthy", {"backend": store.backend}, error=str(exc))
            return CheckResult("healthy", {"backend": store.backend})

        return ping

    health.register("kv", check(stores.kv))
    health.register("blobs", check(stores.blobs))
