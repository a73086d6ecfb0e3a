"""The auth-failure limiter: a client address that fails authentication AUTH_FAILURE_LIMIT times within
AUTH_FAILURE_WINDOW_SECONDS is refused (429) for AUTH_FAILURE_BLOCK_SECONDS, on every node (KV).

The client address is the peer's, or, when the peer is one of TRUSTED_PROXIES, the last address of
``X-Forwarded-For`` that is not a trusted proxy (so a client cannot forge its way out of a block by
sending its own header). A node remembers for a second that an address is not blocked, so the hot
path costs no store call per request.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable

from interpreter.errors import RateLimited
from interpreter.stores.protocols import KV

security_log = logging.getLogger("interpreter.security")

NOT_BLOCKED_CACHE_S = 1.0
CACHE_MAX = 10_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The address to account a request to."""

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    address = peer or "?"
    if not trusted or not is_trusted(address) or not forwarded_for:
        return address
    for hop in reversed([hop.strip() for hop in forwarded_for.split(",") if hop.strip()]):
        if not is_trusted(hop):
            return hop[:64]
        address = hop
    return address[:64]


class FailureLimiter:
    def __init__(self, kv: KV, *, limit: int, window_s: int, block_s: int,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.kv, self.limit, self.window_s, self.block_s, self.clock = kv, limit, window_s, block_s, clock
        self._clear_until: dict[str, float] = {}

    async def check(self, address: str) -> None:
        """Raises RateLimited (429) while ``address`` is blocked."""
        if self._clear_until.get(address, 0) > self.clock():
            return
        left = await self.kv.ttl(f"authblock:{address}")
        if left is not None:
            raise RateLimited("Too many failed authentication attempts", retry_after_s=int(left) + 1)
        if len(self._clear_until) > CACHE_MAX:
            self._clear_until.clear()
        self._clear_until[address] = self.clock() + NOT_BLOCKED_CACHE_S

    async def failed(self, address: str) -> None:
        """Count a failure; the one that reaches the limit blocks the address (a security event)."""
        count = await self.kv.incr(f"authfail:{address}", ttl_s=self.window_s)
        if count >= self.limit and await self.kv.set_nx(f"authblock:{address}", b"1", ttl_s=self.block_s):
            self._clear_until.pop(address, None)
            await self.kv.delete(f"authfail:{address}")
            security_log.warning(
                "client blocked after repeated authentication failures",
                extra={"fields": {"client": address, "failures": count, "block_seconds": self.block_s}},
            )
