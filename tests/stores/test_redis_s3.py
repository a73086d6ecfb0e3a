"""What only RedisKV and S3Blobs have to prove, against a real redis-server and moto_server (DESIGN §4).

The behaviour every adapter shares is in test_contract.py; here: REDIS_URL overriding the REDIS_*
parts, glob characters in key prefixes, bucket creation and its LocationConstraint rule, multipart
uploads (streamed, bounded, aborted), pagination, and stores that are down or silent.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import replace

import pytest
import trio
import trio_asyncio

from interpreter.errors import SettingsError
from interpreter.settings import load_settings
from interpreter.stores.blobs_s3 import MIB, PART_SIZE, S3Blobs, S3Config, _NotFound, open_s3_blobs
from interpreter.stores.kv_redis import RedisConfig, RedisKV, glob_escape, open_redis_kv
from interpreter.stores.protocols import BlobNotFound, BlobTooLarge, StoreError
from tests.conftest import free_port
from tests.stores.conftest import REDIS_SERVER, StoreServer, need_binary, open_raw_s3, redis_server, s3_config

PASSWORD = "pw-" + secrets.token_hex(8)


def redis_config(**env: str) -> RedisConfig:
    return RedisConfig.from_settings(load_settings(env, env_file=None))


def full_text(exc: BaseException) -> str:
    """The message, the type names and every chained cause: all an operator's log could show."""
    return "".join(traceback.format_exception(exc))


class stream:  # lower case: it reads as the function it stands for
    """``total`` deterministic bytes in ``chunk``-sized pieces, made on the fly (never all in memory).

    A plain async iterator, not a generator: a put that stops half-way leaves nothing to finalise.
    """

    def __init__(self, total: int, chunk: int = MIB) -> None:
        self.total, self.chunk, self.offset = total, chunk, 0

    def __aiter__(self) -> stream:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.offset >= self.total:
            raise StopAsyncIteration
        size = min(self.chunk, self.total - self.offset)
        block = hashlib.sha256(self.offset.to_bytes(8, "big")).digest()
        self.offset += size
        return (block * (size // len(block) + 1))[:size]


async def digest_of(chunks: AsyncIterable[bytes]) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    async for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


async def read_digest(blobs: S3Blobs, key: str) -> tuple[int, str]:
    async with contextlib.aclosing(blobs.get(key)) as chunks:
        return await digest_of(chunks)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections (into the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.fixture
def private_redis() -> Iterator[StoreServer]:
    """A redis-server of this test's own, with a password, that the test may stop."""
    need_binary(REDIS_SERVER, "redis-server")
    server = redis_server(password=PASSWORD)
    server.start()
    yield server
    server.close()


# --- RedisConfig ---------------------------------------------------------------------------------


VARIABLES = {
    "REDIS_HOST": "redis.internal",
    "REDIS_PORT": "6390",
    "REDIS_PASSWORD": "from-variable",
    "REDIS_DB": "2",
    "REDIS_MAX_CONNECTIONS": "7",
    "REDIS_SOCKET_TIMEOUT": "3",
    "REDIS_SOCKET_CONNECT_TIMEOUT": "4",
}


def test_redis_variables_without_url() -> None:
    config = redis_config(**VARIABLES)
    assert (config.host, config.port, config.password, config.db) == ("redis.internal", 6390, "from-variable", 2)
    assert (config.max_connections, config.socket_timeout_s, config.socket_connect_timeout_s) == (7, 3, 4)
    assert config.username is None
    assert config.ssl is False
    assert "from-variable" not in repr(config)


def test_redis_url_overrides_the_parts_it_gives() -> None:
    config = redis_config(**VARIABLES, REDIS_URL="rediss://app:p%40ss@cache.example:6380/5")
    assert (config.host, config.port, config.db) == ("cache.example", 6380, 5)
    assert (config.username, config.password, config.ssl) == ("app", "p@ss", True)
    # Pool and timeouts have no place in the URL: they stay the variables'.
    assert (config.max_connections, config.socket_timeout_s, config.socket_connect_timeout_s) == (7, 3, 4)

    # A URL that leaves parts out keeps the variables for them.
    partial = redis_config(**VARIABLES, REDIS_URL="redis://cache.example")
    assert (partial.host, partial.port, partial.password, partial.db) == ("cache.example", 6390, "from-variable", 2)

    # The guide's own example: userinfo without a colon is the password (as redis-cli reads it).
    guide = redis_config(REDIS_URL="redis://password@localhost:6379/0")
    assert (guide.host, guide.port, guide.db, guide.username, guide.password) == (
        "localhost",
        6379,
        0,
        None,
        "password",
    )

    assert redis_config(REDIS_URL="redis://:only-password@h/1?db=4").password == "only-password"
    assert redis_config(REDIS_URL="redis://h/1?db=4").db == 4
    assert redis_config(REDIS_URL="unix:///run/redis.sock").unix_socket_path == "/run/redis.sock"


@pytest.mark.parametrize(
    "url", ["http://cache.example:6379", "redis://:topsecret@cache.example:99999999", "redis://h/not-a-db"]
)
def test_redis_url_invalid(url: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_URL") as caught:
        redis_config(REDIS_URL=url)
    assert "topsecret" not in full_text(caught.value)


# --- RedisKV on the real server --------------------------------------------------------------------


async def test_keys_with_glob_characters_in_the_prefix(redis_kv: RedisKV) -> None:
    odd = "p*re?fix[ab]\\x/"
    keys = [odd + "1", odd + "2", "p-re-fix-a-x/3", "pXreXfixaXx/4", "p*re?fix[ab]\\y/5", "p\\*re/6"]
    for key in keys:
        await redis_kv.set(key, b"v")
    # Unescaped, "p*re?fix[ab]" would match "pXreXfixaXx" and friends.
    assert await redis_kv.keys(odd) == [odd + "1", odd + "2"]
    assert await redis_kv.keys("p\\*") == ["p\\*re/6"]
    assert await redis_kv.keys("[") == []
    assert sorted(await redis_kv.keys("")) == sorted(keys)
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"


async def test_namespaces_do_not_see_each_other(redis_kv: RedisKV, redis_url: str) -> None:
    await redis_kv.set("shared-name", b"mine")
    other = replace(redis_config(REDIS_URL=redis_url), namespace=f"other-{secrets.token_hex(4)}:")
    async with trio_asyncio.open_loop(), open_redis_kv(other) as neighbour:
        assert await neighbour.get("shared-name") is None
        assert await neighbour.keys("") == []
    assert await redis_kv.keys("") == ["shared-name"]


async def test_float_ttls_are_milliseconds(redis_kv: RedisKV) -> None:
    await redis_kv.set("short", b"x", ttl_s=0.25)
    left = await redis_kv.ttl("short")
    assert left is not None
    assert 0.15 < left <= 0.25
    await redis_kv.set("tiny", b"x", ttl_s=0.0001)  # below a millisecond: the shortest TTL Redis takes
    await trio.sleep(0.01)
    assert await redis_kv.get("tiny") is None
    assert await redis_kv.set_nx("lease", b"x", ttl_s=1.5) is True
    left = await redis_kv.ttl("lease")
    assert left is not None
    assert 1.4 < left <= 1.5


async def test_incr_leaves_an_existing_keys_expiry_alone(redis_kv: RedisKV) -> None:
    await redis_kv.set("persistent", b"5")
    assert await redis_kv.incr("persistent", 2, ttl_s=30) == 7
    assert await redis_kv.ttl("persistent") is None  # existed without expiry: stays so
    assert await redis_kv.incr("fresh", 3, ttl_s=30) == 3
    assert await redis_kv.incr("fresh", ttl_s=0.1) == 4
    left = await redis_kv.ttl("fresh")
    assert left is not None
    assert 29 < left <= 30  # set at creation, not reset


async def test_a_closed_kv_raises_store_error(redis_url: str) -> None:
    async with trio_asyncio.open_loop(), open_redis_kv(redis_config(REDIS_URL=redis_url)) as store:
        await store.aclose()
        await store.aclose()  # idempotent
        with pytest.raises(StoreError, match="closed"):
            await store.get("anything")


async def test_url_password_authenticates_and_a_wrong_one_is_refused(private_redis: StoreServer) -> None:
    async with trio_asyncio.open_loop():
        port = private_redis.port
        async with open_redis_kv(redis_config(REDIS_URL=f"redis://{PASSWORD}@127.0.0.1:{port}/1")) as store:
            await store.set("k", b"v")
            assert await store.get("k") == b"v"
        wrong = redis_config(REDIS_URL=f"redis://:wrong-{PASSWORD}@127.0.0.1:{port}/1")
        with pytest.raises(StoreError) as caught:
            async with open_redis_kv(wrong):
                pass  # pragma: no cover
        assert PASSWORD not in full_text(caught.value)


def redis_command(port: int, *args: str) -> bytes:
    """One command on a fresh connection, authenticated with PASSWORD; the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"AUTH {PASSWORD}\r\n".encode())
        assert sock.recv(64).startswith(b"+OK")
        sock.sendall(b"".join(arg.encode() + (b"\r\n" if i == len(args) - 1 else b" ") for i, arg in enumerate(args)))
        return sock.recv(1024)


async def test_calls_wait_for_a_free_connection(private_redis: StoreServer) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/0"
    config = replace(redis_config(REDIS_URL=url), max_connections=2)
    async with trio_asyncio.open_loop(), open_redis_kv(config) as store, trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(store.incr, "counter", i)
    async with trio_asyncio.open_loop(), open_redis_kv(config) as store:
        assert await store.get("counter") == str(sum(range(50))).encode()


@pytest.mark.slow
async def test_a_call_cut_by_its_timeout_leaves_the_client_usable(private_redis: StoreServer) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/0"
    config = replace(redis_config(REDIS_URL=url), max_connections=1, call_timeout_s=0.3)
    async with trio_asyncio.open_loop(), open_redis_kv(config) as store:
        await store.set("k", b"before")
        # The server holds every other client's commands for 0.8 s: the GET is sent, then cut off.
        assert await trio.to_thread.run_sync(redis_command, private_redis.port, "CLIENT", "PAUSE", "800") == b"+OK\r\n"
        with pytest.raises(StoreError, match="timed out"):
            await store.get("k")
        await trio.sleep(0.8)
        # The one pooled connection had a reply in flight; it must not answer the next command with it.
        await store.set("k2", b"after")
        assert await store.get("k") == b"before"
        assert await store.get("k2") == b"after"


@pytest.mark.slow
async def test_redis_down_is_a_store_error_within_the_timeout(silent_port: int) -> None:
    async with trio_asyncio.open_loop():
        closed = free_port()
        refused = redis_config(REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{closed}/0")
        t0 = trio.current_time()
        with pytest.raises(StoreError) as caught:
            async with open_redis_kv(refused):
                pass  # pragma: no cover
        assert trio.current_time() - t0 < 2
        assert PASSWORD not in full_text(caught.value)
        assert str(closed) not in str(caught.value)

        # A server that accepts the connection and never answers: the socket timeout, then StoreError.
        silent = replace(
            redis_config(REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{silent_port}/0"),
            socket_timeout_s=0.3,
            socket_connect_timeout_s=0.3,
            call_timeout_s=1.5,
        )
        t0 = trio.current_time()
        with pytest.raises(StoreError) as caught:
            async with open_redis_kv(silent):
                pass  # pragma: no cover
        assert trio.current_time() - t0 < 2.5
        assert PASSWORD not in full_text(caught.value)


@pytest.mark.slow
async def test_redis_going_away_is_a_store_error(private_redis: StoreServer) -> None:
    async with trio_asyncio.open_loop():
        config = replace(
            redis_config(REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{private_redis.port}/0"), call_timeout_s=2
        )
        async with open_redis_kv(config) as store:
            await store.set("k", b"v")
            await trio.to_thread.run_sync(private_redis.stop)
            t0 = trio.current_time()
            with pytest.raises(StoreError) as caught:
                await store.get("k")
            assert trio.current_time() - t0 < 2.5
            assert PASSWORD not in full_text(caught.value)
            with pytest.raises(StoreError):
                await store.ping()


# --- S3Blobs on moto_server ------------------------------------------------------------------------


def test_s3_config_from_settings() -> None:
    settings = load_settings(
        {"S3_ENDPOINT": "s3.example:9000", "S3_SECURE": "true", "S3_SECRET_KEY": "the-secret"}, env_file=None
    )
    config = S3Config.from_settings(settings)
    assert config.endpoint_url == "https://s3.example:9000"
    assert (config.bucket, config.region, config.secret_key) == ("code-interpreter-files", "garage", "the-secret")
    assert "the-secret" not in repr(config)
    plain = S3Config.from_settings(load_settings({"S3_ENDPOINT": "127.0.0.1:3900"}, env_file=None))
    assert plain.endpoint_url == "http://127.0.0.1:3900"


@pytest.mark.slow
@pytest.mark.parametrize(("region", "constraint"), [("us-east-1", None), ("eu-west-1", "eu-west-1")])
async def test_bucket_created_when_missing_with_location_constraint(
    s3_endpoint: str, region: str, constraint: str | None
) -> None:
    config = s3_config(s3_endpoint, region=region)
    async with trio_asyncio.open_loop(), open_raw_s3(s3_endpoint, region) as raw:
        try:
            async with open_s3_blobs(config) as blobs:
                await blobs.ping()
            location = await raw("get_bucket_location", Bucket=config.bucket)
            assert location.get("LocationConstraint") == constraint
            # Opening again finds the bucket and leaves it alone.
            async with open_s3_blobs(config) as blobs:
                assert await blobs.list("") == []
        finally:
            await raw.empty_bucket(config.bucket)


@pytest.mark.slow
async def test_a_bucket_another_node_created_meanwhile_is_used(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = s3_config(s3_endpoint, region="eu-west-1")
    async with trio_asyncio.open_loop(), open_s3_blobs(config) as blobs:
        real_ping = blobs.ping
        pings = []

        async def ping_before_the_other_node() -> None:
            pings.append(trio.current_time())
            if len(pings) == 1:  # this node's HEAD ran just before the other node's CreateBucket
                raise _NotFound("s3: ping: not found", "404")
            await real_ping()

        monkeypatch.setattr(blobs, "ping", ping_before_the_other_node)
        await blobs.ensure_bucket()  # CreateBucket answers BucketAlreadyOwnedByYou: HEAD again, and use it
        assert len(pings) == 2
        await blobs.put("k", stream(3))
        async with open_raw_s3(s3_endpoint) as raw:
            await raw.empty_bucket(config.bucket)


@pytest.mark.slow
async def test_the_server_enforces_the_location_constraint_rule(s3_endpoint: str) -> None:
    """Why the rule exists: moto, like AWS, refuses both other combinations."""
    async with trio_asyncio.open_loop():
        async with open_raw_s3(s3_endpoint, "eu-west-1") as raw:
            with pytest.raises(Exception, match="IllegalLocationConstraint"):
                await raw("create_bucket", Bucket=f"test-{secrets.token_hex(6)}")
        async with open_raw_s3(s3_endpoint, "us-east-1") as raw:
            with pytest.raises(Exception, match="InvalidLocationConstraint"):
                await raw(
                    "create_bucket",
                    Bucket=f"test-{secrets.token_hex(6)}",
                    CreateBucketConfiguration={"LocationConstraint": "us-east-1"},
                )


async def etag(s3_endpoint: str, bucket: str, key: str) -> str:
    async with open_raw_s3(s3_endpoint) as raw:
        return str((await raw("head_object", Bucket=bucket, Key=key))["ETag"])


async def pending_uploads(s3_endpoint: str, bucket: str) -> list[object]:
    async with open_raw_s3(s3_endpoint) as raw:
        return list((await raw("list_multipart_uploads", Bucket=bucket)).get("Uploads", []))


@pytest.mark.slow
async def test_multipart_put_streams_20_mib(s3_blobs: S3Blobs, s3_endpoint: str) -> None:
    total = 20 * MIB + 123
    expected = await digest_of(stream(total))
    assert await s3_blobs.put("big/file.bin", stream(total)) == total
    assert await read_digest(s3_blobs, "big/file.bin") == expected
    info = await s3_blobs.head("big/file.bin")
    assert info is not None
    assert info.size == total
    bucket = s3_blobs._bucket
    parts = -(-total // PART_SIZE)  # 5 + 5 + 5 + 5 MiB + 123 bytes
    assert (await etag(s3_endpoint, bucket, "big/file.bin")).endswith(f'-{parts}"')
    assert await pending_uploads(s3_endpoint, bucket) == []


@pytest.mark.slow
async def test_one_part_or_less_is_a_single_put(s3_blobs: S3Blobs, s3_endpoint: str) -> None:
    bucket = s3_blobs._bucket
    assert await s3_blobs.put("exact", stream(PART_SIZE)) == PART_SIZE
    assert "-" not in await etag(s3_endpoint, bucket, "exact")
    assert await s3_blobs.put("one-more", stream(PART_SIZE + 1)) == PART_SIZE + 1
    assert (await etag(s3_endpoint, bucket, "one-more")).endswith('-2"')
    assert await read_digest(s3_blobs, "one-more") == await digest_of(stream(PART_SIZE + 1))
    # One chunk bigger than several parts is cut into parts too.
    one_chunk = 17 * MIB
    assert await s3_blobs.put("one-chunk", stream(one_chunk, one_chunk)) == one_chunk
    assert (await etag(s3_endpoint, bucket, "one-chunk")).endswith(f'-{-(-one_chunk // PART_SIZE)}"')
    assert await read_digest(s3_blobs, "one-chunk") == await digest_of(stream(one_chunk, one_chunk))


@pytest.mark.slow
async def test_max_bytes_overflow_aborts_the_multipart_upload(s3_blobs: S3Blobs, s3_endpoint: str) -> None:
    await s3_blobs.put("kept", stream(10))
    with pytest.raises(BlobTooLarge):
        await s3_blobs.put("too-big", stream(20 * MIB), max_bytes=12 * MIB)  # after one part went up
    assert await s3_blobs.head("too-big") is None
    assert [blob.key for blob in await s3_blobs.list("")] == ["kept"]
    assert await pending_uploads(s3_endpoint, s3_blobs._bucket) == []
    # Exactly max_bytes is allowed.
    assert await s3_blobs.put("just-fits", stream(9 * MIB), max_bytes=9 * MIB) == 9 * MIB


@pytest.mark.slow
async def test_cancelled_and_failed_multipart_uploads_are_aborted(s3_blobs: S3Blobs, s3_endpoint: str) -> None:
    uploaded_one_part = trio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        async for chunk in stream(PART_SIZE + 2 * MIB):
            yield chunk
        uploaded_one_part.set()  # the put uploads part 1 before it asks for the next chunk
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    async def breaks() -> AsyncIterator[bytes]:
        async for chunk in stream(PART_SIZE + 2 * MIB):
            yield chunk
        raise ConnectionResetError("the client went away")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(s3_blobs.put, "cancelled", stalls())
        await uploaded_one_part.wait()
        nursery.cancel_scope.cancel()
    with pytest.raises(ConnectionResetError):
        await s3_blobs.put("failed", breaks())
    assert await s3_blobs.list("") == []
    assert await pending_uploads(s3_endpoint, s3_blobs._bucket) == []


@pytest.mark.slow
async def test_get_streams_and_can_stop_early(s3_blobs: S3Blobs) -> None:
    await s3_blobs.put("k", stream(3 * MIB))
    async with contextlib.aclosing(s3_blobs.get("k")) as chunks:
        async for chunk in chunks:
            assert 0 < len(chunk) <= 256 * 1024
            break  # the connection is dropped, not drained
    assert await read_digest(s3_blobs, "k") == await digest_of(stream(3 * MIB))
    with pytest.raises(BlobNotFound):
        await read_digest(s3_blobs, "missing")


@pytest.mark.slow
async def test_list_paginates(s3_endpoint: str) -> None:
    config = replace(s3_config(s3_endpoint), list_page_size=2)
    async with trio_asyncio.open_loop(), open_s3_blobs(config) as blobs:
        names = [f"p/{i:02d}" for i in range(7)]
        for name in names:
            await blobs.put(name, stream(len(name)))
        await blobs.put("q/other", stream(1))
        listed = await blobs.list("p/")
        assert [blob.key for blob in listed] == names
        assert [blob.size for blob in listed] == [4] * 7
        async with open_raw_s3(s3_endpoint) as raw:
            await raw.empty_bucket(config.bucket)


async def test_s3_refuses_keys_the_directory_store_refuses(s3_blobs: S3Blobs) -> None:
    for key in ["../escape", "/absolute", "a//b", "a/./b", "a/../b", "", "nul\0byte", "x" * 1025]:
        with pytest.raises(StoreError):
            await s3_blobs.put(key, stream(1))
        with pytest.raises(StoreError):
            await s3_blobs.head(key)
        with pytest.raises(StoreError):
            await read_digest(s3_blobs, key)
        with pytest.raises(StoreError):
            await s3_blobs.delete(key)
    assert await s3_blobs.list("") == []


@pytest.mark.slow
async def test_s3_down_is_a_store_error_within_the_timeout(silent_port: int) -> None:
    closed = free_port()
    secret = "secret-" + secrets.token_hex(8)
    refused = replace(s3_config(f"127.0.0.1:{closed}"), secret_key=secret, call_timeout_s=3)
    async with trio_asyncio.open_loop():
        t0 = trio.current_time()
        with pytest.raises(StoreError) as caught:
            async with open_s3_blobs(refused):
                pass  # pragma: no cover
        assert trio.current_time() - t0 < 3.5  # within call_timeout_s (one retry, jittered backoff)
        assert secret not in full_text(caught.value)
        assert str(closed) not in str(caught.value)

        silent = replace(
            s3_config(f"127.0.0.1:{silent_port}"), secret_key=secret, read_timeout_s=0.3, call_timeout_s=1.5
        )
        t0 = trio.current_time()
        with pytest.raises(StoreError) as caught:
            async with open_s3_blobs(silent):
                pass  # pragma: no cover
        assert trio.current_time() - t0 < 2.5
        assert secret not in full_text(caught.value)
