"""Python checkpoints in the stores (both pairs): KV or blob by size, generations, archival, the run lock."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio_asyncio

from interpreter.execution.state import SessionBusy, StateStore
from interpreter.settings import load_settings
from interpreter.stores.blobs_dir import open_dir_blobs
from interpreter.stores.kv_sqlite import open_sqlite_kv
from interpreter.stores.protocols import KV, Blobs
from tests.stores.conftest import s3_config

OWNER = "c" * 16


@pytest.fixture(params=["embedded", "distributed"])
async def state(request: pytest.FixtureRequest, work_dir: Path) -> AsyncIterator[StateStore]:
    def store(kv: KV, blobs: Blobs) -> StateStore:
        return StateStore(kv, blobs, ttl_s=60, kv_max_bytes=1000, archive_after_s=0.5, archive_ttl_s=3600)

    if request.param == "embedded":
        async with open_sqlite_kv(work_dir / "kv.sqlite3") as kv, open_dir_blobs(work_dir / "blobs") as blobs:
            yield store(kv, blobs)
        return
    from interpreter.stores.blobs_s3 import open_s3_blobs
    from interpreter.stores.kv_redis import RedisConfig, open_redis_kv

    loaded = load_settings({"REDIS_URL": request.getfixturevalue("redis_url")}, env_file=None)
    redis = replace(RedisConfig.from_settings(loaded), namespace=f"state-{secrets.token_hex(6)}:")
    s3 = s3_config(request.getfixturevalue("s3_endpoint"))
    async with trio_asyncio.open_loop(), open_redis_kv(redis) as redis_kv, open_s3_blobs(s3) as s3_blobs:
        yield store(redis_kv, s3_blobs)


async def test_checkpoints_bump_the_generation_and_big_ones_go_to_blobs(state: StateStore) -> None:
    session = secrets.token_hex(8)
    assert await state.generation(OWNER, session) == 0
    assert await state.load(OWNER, session) is None
    assert await state.save(OWNER, session, b"small") == 1
    assert await state.load(OWNER, session) == b"small"
    big = secrets.token_bytes(5000)  # over kv_max_bytes
    assert await state.save(OWNER, session, big) == 2
    assert await state.load(OWNER, session) == big
    assert await state.blobs.head(f"state/{OWNER}/{session}") is not None
    assert await state.generation(OWNER, session) == 2
    assert await state.load("d" * 16, session) is None  # another owner's session has no state


async def test_idle_checkpoints_are_archived_and_still_restore(state: StateStore) -> None:
    session = secrets.token_hex(8)
    await state.save(OWNER, session, b"archived state")
    assert (await state.archive_idle())["archived"] == 0  # not idle yet
    await trio.sleep(0.8)
    moved = await state.archive_idle()
    assert moved["archived"] >= 1
    assert await state.kv.get(f"state:{OWNER}:{session}") is None  # moved out of KV ...
    assert await state.load(OWNER, session) == b"archived state"  # ... and still what a restore gets
    await state.save(OWNER, session, b"newer")
    await trio.sleep(0.8)
    await state.archive_idle()
    assert await state.load(OWNER, session) == b"newer"  # the archive is refreshed, never stale
    expired = await state.archive_idle(now=time.time() + 7200)
    assert expired["expired_archives"] >= 1
    assert await state.load(OWNER, session) is None


async def test_the_session_lock_serialises_and_gives_up_after_its_wait(state: StateStore) -> None:
    session = secrets.token_hex(8)
    order: list[str] = []

    async def hold(name: str, seconds: float) -> None:
        async with state.session_lock(OWNER, session, lease_s=30, wait_s=10):
            order.append(f"{name} in")
            await trio.sleep(seconds)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "a", 0.3)
        await trio.sleep(0.05)
        nursery.start_soon(hold, "b", 0)
    assert order == ["a in", "a out", "b in", "b out"]
    # Held elsewhere (another node's lease): a waiter gives up with 503.
    await state.kv.set(f"lock:{OWNER}:{session}", b"other node", ttl_s=30)
    with pytest.raises(SessionBusy):
        async with state.session_lock(OWNER, session, lease_s=30, wait_s=0.3):
            pass
