"""The auth-failure limiter: really counting, blocking on every node, and the client address it believes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from interpreter.auth.failures import FailureLimiter, client_address, parse_networks
from interpreter.errors import RateLimited
from interpreter.stores.protocols import KV
from tests.conftest import ServerProcess


async def test_the_limit_blocks_the_address_on_every_node(kv: KV, caplog: pytest.LogCaptureFixture) -> None:
    node_a = FailureLimiter(kv, limit=5, window_s=60, block_s=1)
    node_b = FailureLimiter(kv, limit=5, window_s=60, block_s=1)  # a second node sharing the store
    async with trio.open_nursery() as nursery:  # failures from many requests at once, on both nodes
        for n in range(5):
            nursery.start_soon((node_a if n % 2 else node_b).failed, "203.0.113.7")
    for node in (node_a, node_b):
        with pytest.raises(RateLimited) as blocked:
            await node.check("203.0.113.7")
        assert blocked.value.retry_after_s >= 1
    await node_a.check("203.0.113.8")  # another client is not affected
    assert [r.getMessage() for r in caplog.records].count("client blocked after repeated authentication failures") == 1
    await trio.sleep(1.3)
    await node_b.check("203.0.113.7")  # the block ends


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    proxies = parse_networks(["10.0.0.0/8", "::1/128"])
    assert client_address("198.51.100.1", "1.2.3.4", proxies) == "198.51.100.1"  # not a proxy: its header is ignored
    assert client_address("10.0.0.5", "1.2.3.4", proxies) == "1.2.3.4"
    assert client_address("10.0.0.5", "6.6.6.6, 1.2.3.4, 10.0.0.9", proxies) == "1.2.3.4"  # the forged left part
    assert client_address("10.0.0.5", None, proxies) == "10.0.0.5"
    assert client_address("10.0.0.5", "1.2.3.4", ()) == "10.0.0.5"


def test_a_server_blocks_a_client_that_keeps_failing(work_dir: Path) -> None:
    server = ServerProcess(work_dir, AUTH_FAILURE_LIMIT="3", AUTH_FAILURE_BLOCK_SECONDS="2",
                           TRUSTED_PROXIES="127.0.0.1/32")  # fmt: skip
    server.start()
    try:
        attacker = {"X-Forwarded-For": "192.0.2.66"}
        for _ in range(3):
            bad = httpx.get(f"{server.url}/files/x", headers={"x-api-key": "guess", **attacker}, timeout=10)
            assert bad.status_code == 401
        blocked = httpx.get(f"{server.url}/files/x", headers={**server.headers, **attacker}, timeout=10)
        assert blocked.status_code == 429  # even with the right key, for now
        assert blocked.json()["retry_after_seconds"] >= 1
        assert int(blocked.headers["Retry-After"]) >= 1
        other = httpx.get(f"{server.url}/files/x", headers={**server.headers, "X-Forwarded-For": "192.0.2.77"})
        assert other.status_code == 200
        events = [
            line
            for line in server.log_lines()
            if line["msg"] == "client blocked after repeated authentication failures"
        ]
        assert [event["client"] for event in events] == ["192.0.2.66"]
    finally:
        server.stop()
