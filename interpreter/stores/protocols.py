"""The two storage protocols (DESIGN §4). This module imports nothing else of the project.

KV holds small values with optional TTLs: sessions, file metadata, Python state up to
STATE_MAX_REDIS_SIZE_MB, API keys, rate counters, tokens, locks. Blobs hold file contents and
large state. Adapters: SqliteKV / RedisKV and DirBlobs / S3Blobs; one contract test suite runs
against all four. Every failure of a store surfaces as ``StoreUnavailable`` (503).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from typing import Protocol


class StoreError(Exception):
    """Raised by adapters for any backend failure or timeout; the API maps it to 503."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: float  # unix time


class KV(Protocol):
    """Bytes values by string key. A ``ttl_s`` of None means no expiry; expired keys do not exist."""

    backend: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None: ...

    async def set_nx(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Set only if absent (atomically, across nodes): locks and leases."""
        ...

    async def delete(self, key: str) -> bool:
        """True when the key existed."""
        ...

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Delete only if the current value equals ``value`` (atomically): releasing a lock one holds."""
        ...

    async def take(self, key: str) -> bytes | None:
        """Get and delete in one step (atomically, across nodes): claiming a single-use token."""
        ...

    async def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        """Add atomically and return the new value; ``ttl_s`` is set when the key is created."""
        ...

    async def expire(self, key: str, ttl_s: float) -> bool:
        """Reset the key's TTL; False when it does not exist."""
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left; None when the key has no expiry or does not exist."""
        ...

    async def keys(self, prefix: str) -> list[str]:
        """Every live key (hashes included) that starts with ``prefix``: for sweeps, not for every request."""
        ...

    async def hset(self, key: str, field: str, value: bytes) -> None:
        """Set one field of a hash. Hashes have no TTL; ``delete(key)`` removes a whole hash."""
        ...

    async def hget(self, key: str, field: str) -> bytes | None: ...

    async def hgetall(self, key: str) -> dict[str, bytes]:
        """Every field of the hash in one call ({} when there is no such hash)."""
        ...

    async def hdel(self, key: str, field: str) -> bool:
        """True when the field existed."""
        ...

    async def purge_expired(self) -> int:
        """Remove expired entries the backend does not remove by itself; returns how many."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class Blobs(Protocol):
    """Streams of bytes by key. A put becomes visible only once complete (never half-written)."""

    backend: str

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> int:
        """Store the stream; returns its size. Over ``max_bytes`` raises ``BlobTooLarge`` and stores nothing."""
        ...

    def get(self, key: str) -> AsyncGenerator[bytes, None]:
        """The contents as chunks (an async generator: iterate it inside ``contextlib.aclosing``).

        Raises ``BlobNotFound`` on the first iteration when the key is absent.
        """
        ...

    async def head(self, key: str) -> BlobInfo | None: ...

    async def delete(self, key: str) -> bool: ...

    async def list(self, prefix: str) -> list[BlobInfo]: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class BlobNotFound(Exception):
    """No blob under that key."""


class BlobTooLarge(Exception):
    """A put went over its ``max_bytes``; nothing was stored."""
