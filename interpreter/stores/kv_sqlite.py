"""SqliteKV: the embedded KV store, a SQLite file under DATA_DIR (WAL), used from one worker thread.

TTLs are stored as absolute expiry times and an expired key does not exist for any operation;
``purge_expired`` removes the rows (the session cleanup service calls it). Wall-clock time comes
from an injected ``now`` (STYLE §7), so tests can move it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from interpreter.stores.protocols import StoreError

T = TypeVar("T")
BUSY_TIMEOUT_S = 5.0
CLEANUP_S = 5.0
LIVE = "(expires_at IS NULL OR expires_at > ?)"

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS kv_hash (
    key TEXT NOT NULL,
    field TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (key, field)
) WITHOUT ROWID;
"""


class SqliteKV:
    backend = "sqlite"

    def __init__(self, connection: sqlite3.Connection, now: Callable[[], float]) -> None:
        self._db = connection
        self._now = now
        # One connection, one thread at a time: every statement (and each transaction) is serialised.
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def guarded() -> T:
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite: {type(exc).__name__}") from None

        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    def _expiry(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self._now() + ttl_s

    async def get(self, key: str) -> bytes | None:
        def op() -> bytes | None:
            row = self._db.execute(f"SELECT value FROM kv WHERE key = ? AND {LIVE}", (key, self._now())).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(op)

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        def op() -> None:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                    (key, value, self._expiry(ttl_s)),
                )

        await self._run(op)

    async def set_nx(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        def op() -> bool:
            with self._db:
                now = self._now()
                if self._db.execute(f"SELECT 1 FROM kv WHERE key = ? AND {LIVE}", (key, now)).fetchone():
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                    (key, value, self._expiry(ttl_s)),
                )
                return True

        return await self._run(op)

    async def delete(self, key: str) -> bool:
        def op() -> bool:
            with self._db:
                live = self._db.execute(f"SELECT 1 FROM kv WHERE key = ? AND {LIVE}", (key, self._now())).fetchone()
                self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
                fields = self._db.execute("DELETE FROM kv_hash WHERE key = ?", (key,)).rowcount
                return live is not None or fields > 0

        return await self._run(op)

    async def delete_if(self, key: str, value: bytes) -> bool:
        def op() -> bool:
            with self._db:
                cursor = self._db.execute(f"DELETE FROM kv WHERE key = ? AND value = ? AND {LIVE}",
                                          (key, value, self._now()))  # fmt: skip
                return cursor.rowcount > 0

        return await self._run(op)

    async def take(self, key: str) -> bytes | None:
        def op() -> bytes | None:
            with self._db:
                row = self._db.execute(f"SELECT value FROM kv WHERE key = ? AND {LIVE}", (key, self._now())).fetchone()
                self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
                return None if row is None else bytes(row[0])

        return await self._run(op)

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        def op() -> int:
            with self._db:
                now = self._now()
                row = self._db.execute(f"SELECT value, expires_at FROM kv WHERE key = ? AND {LIVE}",
                                       (key, now)).fetchone()  # fmt: skip
                if row is None:
                    current, expires_at = 0, self._expiry(ttl_s)
                else:
                    try:
                        current = int(bytes(row[0]))
                    except ValueError:
                        raise StoreError("incr: the value is not an integer") from None
                    expires_at = row[1]
                new = current + amount
                self._db.execute("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                                 (key, str(new).encode(), expires_at))  # fmt: skip
                return new

        return await self._run(op)

    async def expire(self, key: str, ttl_s: float) -> bool:
        def op() -> bool:
            with self._db:
                now = self._now()
                cursor = self._db.execute(f"UPDATE kv SET expires_at = ? WHERE key = ? AND {LIVE}",
                                          (now + ttl_s, key, now))  # fmt: skip
                return cursor.rowcount > 0

        return await self._run(op)

    async def ttl(self, key: str) -> float | None:
        def op() -> float | None:
            now = self._now()
            row = self._db.execute(f"SELECT expires_at FROM kv WHERE key = ? AND {LIVE}", (key, now)).fetchone()
            return None if row is None or row[0] is None else max(0.0, row[0] - now)

        return await self._run(op)

    async def keys(self, prefix: str) -> list[str]:
        def op() -> list[str]:
            # substr compares characters exactly (LIKE would be case-insensitive and treat % and _ as wildcards).
            rows = self._db.execute(
                f"SELECT key FROM kv WHERE key >= ? AND substr(key, 1, ?) = ? AND {LIVE} "
                "UNION SELECT DISTINCT key FROM kv_hash WHERE key >= ? AND substr(key, 1, ?) = ? ORDER BY key",
                (prefix, len(prefix), prefix, self._now(), prefix, len(prefix), prefix),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._run(op)

    async def hset(self, key: str, field: str, value: bytes) -> None:
        def op() -> None:
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO kv_hash (key, field, value) VALUES (?, ?, ?)",
                                 (key, field, value))  # fmt: skip

        await self._run(op)

    async def hget(self, key: str, field: str) -> bytes | None:
        def op() -> bytes | None:
            row = self._db.execute("SELECT value FROM kv_hash WHERE key = ? AND field = ?", (key, field)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(op)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        def op() -> dict[str, bytes]:
            rows = self._db.execute("SELECT field, value FROM kv_hash WHERE key = ?", (key,)).fetchall()
            return {row[0]: bytes(row[1]) for row in rows}

        return await self._run(op)

    async def hdel(self, key: str, field: str) -> bool:
        def op() -> bool:
            with self._db:
                return self._db.execute("DELETE FROM kv_hash WHERE key = ? AND field = ?", (key, field)).rowcount > 0

        return await self._run(op)

    async def purge_expired(self) -> int:
        """Delete expired rows; returns how many."""

        def op() -> int:
            with self._db:
                return self._db.execute("DELETE FROM kv WHERE expires_at <= ?", (self._now(),)).rowcount

        return await self._run(op)

    async def ping(self) -> None:
        await self._run(lambda: self._db.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._db.close, limiter=self._limiter)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    # The stdlib's implicit transactions are off (isolation_level=None); `with connection:` then needs BEGIN.
    connection.isolation_level = "DEFERRED"
    return connection


@asynccontextmanager
async def open_sqlite_kv(path: Path, *, now: Callable[[], float] = time.time) -> AsyncIterator[SqliteKV]:
    """Open (creating it if needed) the database at ``path``; closed when the block ends.

    Raises:
        StoreError: the file cannot be opened or is not a database.
    """
    try:
        connection = await trio.to_thread.run_sync(_connect, path)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"sqlite: cannot open the database ({type(exc).__name__})") from None
    store = SqliteKV(connection, now)
    try:
        yield store
    finally:
        with trio.move_on_after(CLEANUP_S, shield=True):
            await store.aclose()
