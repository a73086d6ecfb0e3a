"""Managed API keys (the admin API's): stored hashed in KV, shown once, with optional rate limits.

Keys:  apikey:<sha256>                  the record (JSON); the key itself is never stored
       ratelimit:<sha256>:<period>:<n>  requests in window n of a period (TTL: the period)

Rate limits are fixed windows counted with the store's atomic increment, so parallel requests on any
number of nodes each get a distinct count and never more than the limit are let through. A lookup is
cached for a few seconds per node, so a revoked or disabled key stops working within that time.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from interpreter.auth.principals import Limits, Principal
from interpreter.errors import AuthenticationFailed, RateLimited
from interpreter.stores.protocols import KV

PERIODS = {"per_second": 1, "per_minute": 60, "hourly": 3600, "daily": 86400, "monthly": 30 * 86400}
CACHE_S = 5.0
PREFIX_SHOWN = 11


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class KeyRecord:
    key_hash: str
    key_prefix: str
    name: str
    created_at: float = field(default_factory=time.time)
    enabled: bool = True
    rate_limits: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(PERIODS))
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "managed"

    def limits(self) -> Limits:
        return Limits(**{period: self.rate_limits.get(period) for period in PERIODS})

    def public(self, usage: tuple[int, float | None] = (0, None)) -> dict[str, Any]:
        return {**asdict(self), "usage_count": usage[0], "last_used_at": usage[1]}


@dataclass
class RateState:
    """What the X-RateLimit-* headers say: the tightest of the key's windows."""

    limit: int
    remaining: int
    reset_s: int


class ManagedKeys:
    def __init__(self, kv: KV, *, rate_limits_enabled: bool, clock: Callable[[], float] = time.time) -> None:
        self.kv, self.rate_limits_enabled, self.clock = kv, rate_limits_enabled, clock
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    async def create(
        self, name: str, rate_limits: dict[str, int | None], metadata: dict[str, str]
    ) -> tuple[str, KeyRecord]:
        """A new key (returned once, never stored) and its record."""
        key = "sk-" + secrets.token_urlsafe(24)
        limits = {**dict.fromkeys(PERIODS), **rate_limits}
        record = KeyRecord(key_digest(key), key[:PREFIX_SHOWN], name, rate_limits=limits, metadata=metadata)
        await self.save(record)
        return key, record

    async def save(self, record: KeyRecord) -> None:
        await self.kv.set(f"apikey:{record.key_hash}", json.dumps(asdict(record)).encode())
        self._cache.pop(record.key_hash, None)

    async def get(self, key_hash: str) -> KeyRecord | None:
        raw = await self.kv.get(f"apikey:{key_hash}")
        if raw is None:
            return None
        try:
            return KeyRecord(**json.loads(raw))
        except (ValueError, TypeError):
            return None

    async def delete(self, key_hash: str) -> bool:
        self._cache.pop(key_hash, None)
        for counter in ("apikey-usage", "apikey-used"):
            await self.kv.delete(f"{counter}:{key_hash}")
        return await self.kv.delete(f"apikey:{key_hash}")

    async def records(self) -> list[KeyRecord]:
        found = [await self.get(key.removeprefix("apikey:")) for key in await self.kv.keys("apikey:")]
        return sorted((r for r in found if r is not None), key=lambda r: r.created_at, reverse=True)

    async def usage(self, key_hash: str) -> tuple[int, float | None]:
        """(requests authenticated, time of the last one)."""
        raw = await self.kv.get(f"apikey-usage:{key_hash}")
        used = await self.kv.get(f"apikey-used:{key_hash}")
        return (int(raw) if raw and raw.isdigit() else 0), (float(used) if used else None)

    async def principal(self, key: str) -> tuple[Principal, RateState | None]:
        """The principal of a managed key, after its rate limits.

        Raises:
            AuthenticationFailed: unknown, disabled or revoked (401).
            RateLimited: over one of its limits (429).
        """
        digest = key_digest(key)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            record = cached[1]
        else:
            record = await self.get(digest)
            self._cache[digest] = (time.monotonic() + CACHE_S, record)
        if record is None or not record.enabled:
            raise AuthenticationFailed("Invalid API key")
        state = await self._count(record) if self.rate_limits_enabled else None
        await self.kv.incr(f"apikey-usage:{digest}")
        await self.kv.set(f"apikey-used:{digest}", repr(self.clock()).encode())
        return Principal(id=f"key:{digest[:16]}", kind="key", limits=record.limits()), state

    async def _count(self, record: KeyRecord) -> RateState | None:
        now = self.clock()
        tightest: RateState | None = None
        for period, seconds in PERIODS.items():
            limit = record.rate_limits.get(period)
            if limit is None:
                continue
            window = math.floor(now / seconds)
            reset_s = max(1, math.ceil((window + 1) * seconds - now))
            count = await self.kv.incr(f"ratelimit:{record.key_hash}:{period}:{window}", ttl_s=seconds + 1)
            if count > limit:
                raise RateLimited(f"Rate limit exceeded ({limit} {period.replace('_', ' ')})", retry_after_s=reset_s,
                                  limit=limit, reset_s=reset_s)  # fmt: skip
            state = RateState(limit, limit - count, reset_s)
            if tightest is None or state.remaining < tightest.remaining:
                tightest = state
        return tightest
