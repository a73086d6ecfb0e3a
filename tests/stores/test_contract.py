"""One contract, four adapters (DESIGN §4): SqliteKV and RedisKV, DirBlobs and S3Blobs behave alike."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio_asyncio

from interpreter.settings import load_settings
from interpreter.stores.blobs_dir import open_dir_blobs
from interpreter.stores.protocols import KV, BlobNotFound, Blobs, BlobTooLarge, StoreError

TTL_S = 0.3


@pytest.fixture(params=["dir", "s3"])
async def blobs(request: pytest.FixtureRequest, work_dir: Path) -> AsyncIterator[Blobs]:
    if request.param == "dir":
        async with open_dir_blobs(work_dir / "blobs") as store:
            yield store
        return
    from interpreter.stores.blobs_s3 import S3Config, open_s3_blobs

    endpoint = request.getfixturevalue("s3_endpoint")
    settings = load_settings(
        {"S3_ENDPOINT": endpoint, "S3_BUCKET": f"contract-{secrets.token_hex(6)}", "S3_REGION": "us-east-1"},
        env_file=None,
    )
    async with trio_asyncio.open_loop(), open_s3_blobs(S3Config.from_settings(settings)) as store:
        yield store


def unique(name: str) -> str:
    """Keys of their own per test: the Redis and S3 servers are shared by the whole session."""
    return f"t{secrets.token_hex(4)}/{name}"


# --- KV ---------------------------------------------------------------------------------------------


async def test_get_set_roundtrip_binary(kv: KV) -> None:
    key = unique("value")
    assert await kv.get(key) is None
    value = bytes(range(256)) * 4096  # 1 MiB with every byte value, NULs included
    await kv.set(key, value)
    assert await kv.get(key) == value
    await kv.set(key, b"replaced")
    assert await kv.get(key) == b"replaced"
    assert await kv.ttl(key) is None  # no expiry unless asked for


async def test_ttl_expires_keys(kv: KV) -> None:
    key = unique("ephemeral")
    await kv.set(key, b"x", ttl_s=TTL_S)
    left = await kv.ttl(key)
    assert left is not None
    assert 0 < left <= TTL_S
    assert await kv.get(key) == b"x"
    await trio.sleep(TTL_S + 0.3)
    assert await kv.get(key) is None
    assert await kv.ttl(key) is None
    assert await kv.keys(key) == []
    assert await kv.delete(key) is False  # an expired key does not exist for any operation


async def test_set_without_ttl_clears_a_previous_ttl(kv: KV) -> None:
    key = unique("persist")
    await kv.set(key, b"1", ttl_s=TTL_S)
    await kv.set(key, b"2")
    assert await kv.ttl(key) is None


async def test_expire(kv: KV) -> None:
    key = unique("expire")
    assert await kv.expire(key, 10) is False
    await kv.set(key, b"x")
    assert await kv.expire(key, TTL_S) is True
    await trio.sleep(TTL_S + 0.3)
    assert await kv.get(key) is None


async def test_set_nx_is_exclusive_under_concurrency(kv: KV) -> None:
    key = unique("lock")
    winners: list[int] = []

    async def contend(i: int) -> None:
        if await kv.set_nx(key, str(i).encode(), ttl_s=5):
            winners.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(contend, i)
    assert len(winners) == 1
    assert await kv.get(key) == str(winners[0]).encode()
    assert await kv.set_nx(key, b"again") is False


async def test_set_nx_succeeds_after_expiry(kv: KV) -> None:
    key = unique("lease")
    assert await kv.set_nx(key, b"a", ttl_s=TTL_S) is True
    await trio.sleep(TTL_S + 0.3)
    assert await kv.set_nx(key, b"b") is True
    assert await kv.get(key) == b"b"


async def test_delete_and_delete_if(kv: KV) -> None:
    key = unique("owned")
    assert await kv.delete(key) is False
    await kv.set(key, b"mine")
    assert await kv.delete_if(key, b"theirs") is False
    assert await kv.get(key) == b"mine"
    assert await kv.delete_if(key, b"mine") is True
    assert await kv.get(key) is None
    await kv.set(key, b"x")
    assert await kv.delete(key) is True
    assert await kv.delete(key) is False


async def test_take_hands_a_value_to_exactly_one_caller(kv: KV) -> None:
    key = unique("token")
    assert await kv.take(key) is None
    await kv.set(key, b"once", ttl_s=60)
    winners: list[bytes | None] = []

    async def claim() -> None:
        winners.append(await kv.take(key))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(claim)
    assert sorted(winners, key=lambda value: value or b"") == [None] * 9 + [b"once"]
    assert await kv.get(key) is None
    await kv.set(key, b"stale", ttl_s=0.05)
    await trio.sleep(0.1)
    assert await kv.take(key) is None  # an expired value is never handed out


async def test_incr_is_atomic_and_sets_ttl_on_creation_only(kv: KV) -> None:
    key = unique("counter")

    async def bump() -> None:
        await kv.incr(key, ttl_s=60)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(bump)
    assert await kv.get(key) == b"50"
    assert await kv.incr(key, 5) == 55
    assert await kv.incr(key, -55) == 0
    left = await kv.ttl(key)
    assert left is not None
    assert 0 < left <= 60


async def test_incr_on_a_non_integer_is_a_store_error(kv: KV) -> None:
    key = unique("text")
    await kv.set(key, b"not a number")
    with pytest.raises(StoreError):
        await kv.incr(key)


async def test_keys_by_exact_prefix(kv: KV) -> None:
    base = unique("")
    names = ["a%_*?[x]/1", "a%_*?[x]/2", "a%_X/3", "A%_*?[x]/4", "b/5"]
    for name in names:
        await kv.set(base + name, b"v")
    await kv.set(base + "a%_*?[x]/gone", b"v", ttl_s=0.1)
    await trio.sleep(0.4)
    # Wildcard characters in a prefix are literal, and matching is case-sensitive.
    assert await kv.keys(base + "a%_*?[x]/") == [base + "a%_*?[x]/1", base + "a%_*?[x]/2"]
    assert sorted(await kv.keys(base)) == sorted(base + name for name in names)
    assert await kv.keys(base + "zzz") == []


async def test_hashes(kv: KV) -> None:
    key = unique("hash")
    assert await kv.hgetall(key) == {}
    assert await kv.hget(key, "a") is None
    await kv.hset(key, "a", b"\x00one")
    await kv.hset(key, "é/b:c", b"two")
    await kv.hset(key, "a", b"replaced")
    assert await kv.hgetall(key) == {"a": b"replaced", "é/b:c": b"two"}
    assert await kv.hget(key, "é/b:c") == b"two"
    assert await kv.keys(key) == [key]  # a hash is a key like any other
    assert await kv.hdel(key, "a") is True
    assert await kv.hdel(key, "a") is False
    assert await kv.hgetall(key) == {"é/b:c": b"two"}
    assert await kv.delete(key) is True  # the whole hash
    assert await kv.hgetall(key) == {}
    assert await kv.keys(key) == []


async def test_purge_expired_leaves_live_keys(kv: KV) -> None:
    live, gone = unique("live"), unique("gone")
    await kv.set(live, b"v", ttl_s=60)
    await kv.set(gone, b"v", ttl_s=0.1)
    await trio.sleep(0.3)
    assert await kv.purge_expired() >= 0
    assert await kv.get(live) == b"v"
    assert await kv.get(gone) is None


async def test_ping(kv: KV) -> None:
    await kv.ping()


# --- Blobs ------------------------------------------------------------------------------------------


class chunks_of:  # lower case: it reads as the function it stands for
    """An async iterator over ``data`` in pieces; a plain class, so abandoning it half-way needs no cleanup."""

    def __init__(self, data: bytes, size: int = 64 * 1024) -> None:
        self.pieces = [data[start : start + size] for start in range(0, len(data), size)]

    def __aiter__(self) -> chunks_of:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.pieces:
            raise StopAsyncIteration
        return self.pieces.pop(0)


async def read_all(blobs: Blobs, key: str) -> bytes:
    out = bytearray()
    async with contextlib.aclosing(blobs.get(key)) as stream:
        async for chunk in stream:
            out += chunk
    return bytes(out)


async def test_put_get_head_delete(blobs: Blobs) -> None:
    key = unique("data.bin")
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert await blobs.put(key, chunks_of(data)) == len(data)
    assert hashlib.sha256(await read_all(blobs, key)).digest() == hashlib.sha256(data).digest()
    info = await blobs.head(key)
    assert info is not None
    assert info.key == key
    assert info.size == len(data)
    assert info.modified > 0
    assert await blobs.delete(key) is True
    assert await blobs.head(key) is None
    assert await blobs.delete(key) is False


async def test_missing_blob(blobs: Blobs) -> None:
    key = unique("missing")
    assert await blobs.head(key) is None
    with pytest.raises(BlobNotFound):
        await read_all(blobs, key)


async def test_empty_blob(blobs: Blobs) -> None:
    key = unique("empty")
    assert await blobs.put(key, chunks_of(b"")) == 0
    assert await read_all(blobs, key) == b""


async def test_overwrite_replaces_whole(blobs: Blobs) -> None:
    key = unique("doc")
    await blobs.put(key, chunks_of(b"first version, longer than the second"))
    await blobs.put(key, chunks_of(b"second"))
    assert await read_all(blobs, key) == b"second"


async def test_max_bytes_stores_nothing(blobs: Blobs) -> None:
    key = unique("big")
    with pytest.raises(BlobTooLarge):
        await blobs.put(key, chunks_of(b"x" * 100_000, 10_000), max_bytes=50_000)
    assert await blobs.head(key) is None


async def test_a_failing_source_leaves_nothing_visible(blobs: Blobs) -> None:
    key = unique("interrupted")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await blobs.put(key, broken())
    assert await blobs.head(key) is None
    assert await blobs.list(key) == []


async def test_cancelled_put_leaves_nothing_visible(blobs: Blobs) -> None:
    key = unique("cancelled")

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    with trio.move_on_after(0.5):
        await blobs.put(key, slow())
    assert await blobs.head(key) is None


async def test_list_by_prefix(blobs: Blobs) -> None:
    base = unique("")
    for name in ("s1/f1", "s1/f2", "s1/nested/f3", "s2/f4"):
        await blobs.put(base + name, chunks_of(name.encode()))
    listed = await blobs.list(base + "s1/")
    assert [blob.key for blob in listed] == [base + "s1/f1", base + "s1/f2", base + "s1/nested/f3"]
    assert [blob.size for blob in listed] == [5, 5, 12]
    assert [blob.key for blob in await blobs.list(base + "s2")] == [base + "s2/f4"]
    assert await blobs.list(base + "s3/") == []


async def test_ping_blobs(blobs: Blobs) -> None:
    await blobs.ping()


# --- what only the directory adapter has to prove ------------------------------------------------------


async def test_dir_blobs_never_follow_planted_symlinks(work_dir: Path) -> None:
    secret = work_dir / "secret.txt"
    secret.write_text("host secret")
    root = work_dir / "blobs"
    async with open_dir_blobs(root) as store:
        await store.put("p/s/real", chunks_of(b"ok"))
        (root / "p" / "s" / "link").symlink_to(secret)
        (root / "p" / "evil").symlink_to(work_dir, target_is_directory=True)
        with pytest.raises(BlobNotFound):
            await read_all(store, "p/s/link")
        with pytest.raises(BlobNotFound):
            await read_all(store, "p/evil/secret.txt")
        assert await store.head("p/evil/secret.txt") is None
        assert [blob.key for blob in await store.list("p/")] == ["p/s/real"]
        with pytest.raises(StoreError):
            await store.put("p/evil/secret.txt", chunks_of(b"overwrite"))
    assert secret.read_text() == "host secret"


@pytest.mark.parametrize("key", ["../escape", "/absolute", "a//b", "a/./b", "a/../b", "", ".tmp/x", "nul\0byte"])
async def test_dir_blobs_refuse_keys_that_are_not_plain_paths(work_dir: Path, key: str) -> None:
    async with open_dir_blobs(work_dir / "blobs") as store:
        with pytest.raises(StoreError):
            await store.put(key, chunks_of(b"x"))
        with pytest.raises(StoreError):
            await store.head(key)


async def test_dir_blobs_remove_interrupted_writes_at_open(work_dir: Path) -> None:
    root = work_dir / "blobs"
    (root / ".tmp").mkdir(parents=True)
    (root / ".tmp" / "abandoned.part").write_bytes(b"half")
    async with open_dir_blobs(root) as store:
        assert await store.list("") == []
    assert list((root / ".tmp").iterdir()) == []
