"""RedisKV: the distributed KV store, redis-py's asyncio client driven through trio-asyncio (DESIGN §4).

Every call goes through ``aio_as_trio`` on the loop the client was created in, under
``trio.fail_after(config.call_timeout_s)`` on top of the client's socket timeouts, and every redis,
socket or timeout error becomes ``StoreError`` with a message naming only the operation (never a
host, a password or a key). The compound operations are Lua scripts, so each is one atomic step
on the server whatever the other nodes do. TTLs are sent in milliseconds (``PX``/``PEXPIRE``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio
import trio_asyncio
from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from interpreter.errors import SettingsError
from interpreter.settings import Settings
from interpreter.stores.protocols import StoreError

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0  # one whole call, retries included (the socket timeouts bound each step)
CLEANUP_S = 5.0
SCAN_COUNT = 1000
GLOB_SPECIAL = frozenset("\\*?[]")

# Both scripts touch only KEYS[1], so they are also correct on a cluster slot.
DELETE_IF_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# The TTL is set only when this call created the key (ARGV[2] = '' means none), as SqliteKV does.
INCR_LUA = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created and ARGV[2] ~= '' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""


@dataclass(frozen=True)
class RedisConfig:
    host: str = "localhost"
    port: int = 6379
    password: str | None = field(default=None, repr=False)
    db: int = 0
    username: str | None = None
    ssl: bool = False
    unix_socket_path: str | None = None
    max_connections: int = 20
    socket_timeout_s: float = 5.0
    socket_connect_timeout_s: float = 5.0
    call_timeout_s: float = CALL_TIMEOUT_S
    # Prepended to every key and stripped from ``keys()``: several deployments (or tests) on one server.
    namespace: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisConfig:
        """REDIS_HOST/PORT/PASSWORD/DB, then every part that REDIS_URL gives overrides its variable.

        Raises:
            SettingsError: REDIS_URL is not a redis://, rediss:// or unix:// URL, or its port or
                database number is not a number.
        """
        config = cls(
            host=settings.redis_host,
            port=settings.redis_port,
            password=settings.redis_password,
            db=settings.redis_db,
            max_connections=settings.redis_max_connections,
            socket_timeout_s=settings.redis_socket_timeout_s,
            socket_connect_timeout_s=settings.redis_socket_connect_timeout_s,
            # One connect plus one reply; a retry after a dead pooled connection fits in the default.
            call_timeout_s=max(
                CALL_TIMEOUT_S, settings.redis_socket_connect_timeout_s + settings.redis_socket_timeout_s
            ),
        )
        if not settings.redis_url:
            return config
        try:
            return config.with_url(settings.redis_url)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def with_url(self, url: str) -> RedisConfig:
        """This config with the parts that ``url`` gives (the guide: "overrides individual settings").

        ``redis://secret@host`` (userinfo without a colon, the guide's own example) is a password, as
        redis-cli reads it; ``redis://user:secret@host`` is an ACL user and its password.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("REDIS_URL: the scheme must be redis://, rediss:// or unix://")
        changes: dict[str, Any] = {}
        if parts.username is not None or parts.password is not None:
            if parts.password is None:
                changes["password"] = unquote(parts.username or "")
            else:
                changes["username"] = unquote(parts.username) if parts.username else None
                changes["password"] = unquote(parts.password)
        try:
            if parts.scheme == "unix":
                changes["unix_socket_path"] = unquote(parts.path)
            else:
                changes["ssl"] = parts.scheme == "rediss"
                if parts.hostname:
                    changes["host"] = unquote(parts.hostname)
                if parts.port is not None:
                    changes["port"] = parts.port
                if parts.path.strip("/"):
                    changes["db"] = int(unquote(parts.path).strip("/"))
            if db := parse_qs(parts.query).get("db"):
                changes["db"] = int(db[0])
        except ValueError:
            # urlsplit's own message can quote the URL, and the URL can hold the password.
            raise ValueError("REDIS_URL: invalid port or database number") from None
        return replace(self, **changes)


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH)."""
    return "".join("\\" + char if char in GLOB_SPECIAL else char for char in text)


def _milliseconds(ttl_s: float) -> int:
    # Redis refuses PX 0; a TTL of zero or less means "expires at once", so the shortest one it takes.
    return max(1, math.ceil(ttl_s * 1000))


class RedisKV:
    """The KV protocol on Redis. Build it with ``open_redis_kv``."""

    backend = "redis"

    def __init__(self, client: Redis, loop: Any, config: RedisConfig) -> None:
        self._client = client
        self._loop = loop
        self._config = config
        self._ns = config.namespace
        self._closed = False
        self._delete_if = client.register_script(DELETE_IF_LUA)
        self._incr = client.register_script(INCR_LUA)

    async def _call(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreError(f"redis: {op}: the store is closed")
        try:
            with trio.fail_after(self._config.call_timeout_s):
                return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
        except trio.TooSlowError:
            raise StoreError(f"redis: {op} timed out") from None
        except (RedisError, OSError, EOFError) as exc:
            # OSError covers socket errors and TimeoutError (asyncio's included); the message of a
            # redis-py error can name the host, so only its class is kept.
            raise StoreError(f"redis: {op} failed ({type(exc).__name__})") from exc

    def _key(self, key: str) -> str:
        return self._ns + key

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", self._client.get, self._key(key))
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else _milliseconds(ttl_s)
        await self._call("set", self._client.set, self._key(key), value, px=px)

    async def set_nx(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        px = None if ttl_s is None else _milliseconds(ttl_s)
        return bool(await self._call("set_nx", self._client.set, self._key(key), value, px=px, nx=True))

    async def delete(self, key: str) -> bool:
        return int(await self._call("delete", self._client.delete, self._key(key))) > 0

    async def delete_if(self, key: str, value: bytes) -> bool:
        return int(await self._call("delete_if", self._delete_if, keys=[self._key(key)], args=[value])) > 0

    async def take(self, key: str) -> bytes | None:
        value = await self._call("take", self._client.getdel, self._key(key))
        return None if value is None else bytes(value)

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        px = "" if ttl_s is None else str(_milliseconds(ttl_s))
        return int(await self._call("incr", self._incr, keys=[self._key(key)], args=[str(int(amount)), px]))

    async def expire(self, key: str, ttl_s: float) -> bool:
        return bool(await self._call("expire", self._client.pexpire, self._key(key), _milliseconds(ttl_s)))

    async def ttl(self, key: str) -> float | None:
        left_ms = int(await self._call("ttl", self._client.pttl, self._key(key)))
        # -1: no expiry, -2: no such key.
        return None if left_ms < 0 else left_ms / 1000

    async def keys(self, prefix: str) -> list[str]:
        # SCAN, not KEYS: it never blocks the server for long. A key can come back twice; the set
        # removes duplicates. Redis does not return keys that have expired.
        pattern = glob_escape(self._ns + prefix) + "*"
        found: set[str] = set()
        cursor = 0
        while True:
            cursor, batch = await self._call("keys", self._client.scan, cursor, match=pattern, count=SCAN_COUNT)
            for raw in batch:
                key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
                if key.startswith(self._ns + prefix):
                    found.add(key[len(self._ns) :])
            if int(cursor) == 0:
                return sorted(found)

    async def hset(self, key: str, field: str, value: bytes) -> None:
        await self._call("hset", self._client.hset, self._key(key), field, value)

    async def hget(self, key: str, field: str) -> bytes | None:
        value = await self._call("hget", self._client.hget, self._key(key), field)
        return None if value is None else bytes(value)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        found = await self._call("hgetall", self._client.hgetall, self._key(key))
        return {(k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k)): bytes(v)
                for k, v in found.items()}  # fmt: skip

    async def hdel(self, key: str, field: str) -> bool:
        return int(await self._call("hdel", self._client.hdel, self._key(key), field)) > 0

    async def purge_expired(self) -> int:
        return 0  # Redis removes expired keys itself

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def aclose(self) -> None:
        """Close the connection pool; idempotent. Every later call raises StoreError."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.fail_after(CLEANUP_S):
                await trio_asyncio.aio_as_trio(self._client.aclose, loop=self._loop)()
        except (trio.TooSlowError, RedisError, OSError, EOFError) as exc:
            raise StoreError(f"redis: close failed ({type(exc).__name__})") from exc


def _make_pool(config: RedisConfig) -> BlockingConnectionPool:
    kwargs: dict[str, Any] = {
        "db": config.db,
        "username": config.username,
        "password": config.password,
        "socket_timeout": config.socket_timeout_s,
        "socket_connect_timeout": config.socket_connect_timeout_s,
        # One quick retry, for a pooled connection the server closed while it sat idle; a server
        # that is down fails fast instead of redis-py's default three retries with backoff.
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        "health_check_interval": 30,
    }
    if config.unix_socket_path:
        kwargs.update(connection_class=UnixDomainSocketConnection, path=config.unix_socket_path)
    else:
        kwargs.update(host=config.host, port=config.port, connection_class=SSLConnection if config.ssl else Connection)
    # Blocking: with all REDIS_MAX_CONNECTIONS busy, a call waits for one (within its timeout)
    # instead of failing at once with "Too many connections" as redis-py's default pool does.
    return BlockingConnectionPool(max_connections=config.max_connections, timeout=config.call_timeout_s, **kwargs)


@asynccontextmanager
async def open_redis_kv(config: RedisConfig) -> AsyncIterator[RedisKV]:
    """A RedisKV whose client lives in the running trio-asyncio loop; closed when the block ends.

    The caller holds ``trio_asyncio.open_loop()`` around this block. The server is pinged once, so
    a Redis that is down or refuses the password stops the start (STYLE §2).

    Raises:
        StoreError: Redis does not answer the ping in time, or refuses it.
        RuntimeError: no trio-asyncio loop is running.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("open_redis_kv needs trio_asyncio.open_loop() around it")

    async def make_client() -> Redis:
        # Inside the loop, so that everything the pool binds to a loop binds to this one. The
        # client owns the pool and closes it with itself.
        return Redis.from_pool(_make_pool(config))

    client = await trio_asyncio.aio_as_trio(make_client, loop=loop)()
    store = RedisKV(client, loop, config)
    try:
        await store.ping()
        yield store
    finally:
        with trio.move_on_after(CLEANUP_S, shield=True):
            try:
                await store.aclose()
            except StoreError as exc:
                # Not raised over the block's own outcome: a close failure loses nothing stored.
                log.warning("redis: closing the client failed", extra={"fields": {"error": str(exc)}})
