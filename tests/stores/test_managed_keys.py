"""Managed API keys: the admin API's life cycle, rate limits that never overshoot on either store, headers."""

from __future__ import annotations

import gc
import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from interpreter.auth.managed import ManagedKeys
from interpreter.errors import AuthenticationFailed, RateLimited
from interpreter.stores.protocols import KV
from tests.conftest import ServerProcess

MASTER = "master-" + secrets.token_hex(16)


async def test_parallel_requests_never_exceed_a_limit(kv: KV) -> None:
    nodes = [ManagedKeys(kv, rate_limits_enabled=True, clock=lambda: 1_000_000.5) for _ in range(2)]
    key, _ = await nodes[0].create("burst", {"per_minute": 7}, {})
    allowed: list[int] = []
    refused: list[RateLimited] = []

    async def request(n: int) -> None:
        try:
            _, state = await nodes[n % 2].principal(key)  # two nodes sharing the store
        except RateLimited as exc:
            refused.append(exc)
        else:
            assert state is not None
            allowed.append(state.remaining)

    async with trio.open_nursery() as nursery:
        for n in range(30):
            nursery.start_soon(request, n)
    assert len(allowed) == 7
    assert sorted(allowed) == list(range(7))  # each allowed request saw its own count
    assert len(refused) == 23
    assert {exc.headers["X-RateLimit-Remaining"] for exc in refused} == {"0"}
    assert all(1 <= exc.retry_after_s <= 60 for exc in refused)


async def test_disabled_and_deleted_keys_are_refused(kv: KV) -> None:
    keys = ManagedKeys(kv, rate_limits_enabled=True)
    key, record = await keys.create("short-lived", {}, {})
    principal, state = await keys.principal(key)
    assert (principal.id, principal.kind, state) == (f"key:{record.key_hash[:16]}", "key", None)
    record.enabled = False
    await keys.save(record)
    with pytest.raises(AuthenticationFailed):
        await keys.principal(key)
    await keys.delete(record.key_hash)
    with pytest.raises(AuthenticationFailed):
        await keys.principal(key)
    assert await kv.get(f"apikey:{record.key_hash}") is None
    assert key not in str(await kv.keys(""))  # the key itself is never stored


async def websocket_echo(server: ServerProcess, key: str) -> str:
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/ws/exec", extra_headers=[("x-api-key", key)]) as ws:
        await ws.send_message(json.dumps({"lang": "bash", "code": "echo via ws"}))
        while (event := json.loads(await ws.get_message()))["type"] != "result":
            pass
    gc.collect()
    stdout: str = event["stdout"]
    return stdout


# trio-websocket 0.12 leaves its socket to the garbage collector when the server closes first (collected below).
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_admin_api_and_rate_limit_headers(work_dir: Path) -> None:
    server = ServerProcess(work_dir, MASTER_API_KEY=MASTER)
    server.start()
    admin = {"x-api-key": MASTER}
    try:
        assert httpx.get(f"{server.url}/api/v1/admin/keys", headers=server.headers, timeout=10).status_code == 403
        bad = httpx.post(
            f"{server.url}/api/v1/admin/keys", headers=admin, json={"name": "x", "rate_limits": {"hourly": -1}}
        )
        assert bad.status_code == 422
        created = httpx.post(f"{server.url}/api/v1/admin/keys", headers=admin, timeout=10,
                             json={"name": "team", "rate_limits": {"per_minute": 3}}).json()  # fmt: skip
        key, key_hash = created["api_key"], created["record"]["key_hash"]
        assert key.startswith("sk-")
        assert created["record"]["key_prefix"] == key[:11]
        listed = httpx.get(f"{server.url}/api/v1/admin/keys", headers=admin, timeout=10).json()
        assert [k["source"] for k in listed] == ["managed", "environment"]
        assert (listed[0]["usage_count"], listed[0]["last_used_at"]) == (0, None)
        assert key not in str(listed)
        user = {"x-api-key": key}
        remaining = []
        for _ in range(3):
            reply = httpx.get(f"{server.url}/files/none", headers=user, timeout=10)
            assert reply.status_code == 200
            assert reply.headers["X-RateLimit-Limit"] == "3"
            remaining.append(reply.headers["X-RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]
        used = httpx.get(f"{server.url}/api/v1/admin/keys", headers=admin, timeout=10).json()[0]
        assert used["usage_count"] == 3
        assert used["last_used_at"] > used["created_at"]
        over = httpx.get(f"{server.url}/files/none", headers=user, timeout=10)
        assert over.status_code == 429
        assert over.json()["error_type"] == "rate_limited"
        assert over.json()["retry_after_seconds"] >= 1
        assert over.headers["X-RateLimit-Remaining"] == "0"
        assert int(over.headers["Retry-After"]) >= 1
        # Lift the limit, then disable, then delete.
        patch = httpx.patch(f"{server.url}/api/v1/admin/keys/{key_hash}", headers=admin, json={"rate_limits": {}})
        assert patch.json() is True
        time.sleep(5.5)  # a node caches a key's record for 5 s
        assert httpx.get(f"{server.url}/files/none", headers=user, timeout=10).status_code == 200
        httpx.patch(f"{server.url}/api/v1/admin/keys/{key_hash}", headers=admin, json={"enabled": False})
        assert httpx.delete(f"{server.url}/api/v1/admin/keys/{key_hash}", headers=admin).json() is True
        assert httpx.delete(f"{server.url}/api/v1/admin/keys/{key_hash}", headers=admin).status_code == 404
        env_hash = listed[1]["key_hash"]
        assert httpx.delete(f"{server.url}/api/v1/admin/keys/{env_hash}", headers=admin).status_code == 403
        assert server.exec("echo env", "bash")["stdout"] == "env\n"  # environment keys are unlimited
        stats = httpx.get(f"{server.url}/api/v1/admin/stats", headers=admin, timeout=30).json()
        assert stats["summary"]["total_executions"] == 1
        assert stats["by_language"] == {"bash": 1}
        assert stats["health"]["status"] == "healthy"
        created_ws = httpx.post(f"{server.url}/api/v1/admin/keys", headers=admin, json={"name": "ws"}, timeout=10)
        assert trio.run(websocket_echo, server, created_ws.json()["api_key"]) == "via ws\n"  # managed keys too
    finally:
        server.stop()
