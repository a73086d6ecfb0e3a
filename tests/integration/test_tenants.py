"""Tenant isolation through the real server: two JWT tenants (LibreChat's tokens) and an API key never
see each other's sessions, files or Python state (DESIGN §1, §4, §9)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import ServerProcess, serving

pytestmark = pytest.mark.nsjail

SIGNER = ed25519.Ed25519PrivateKey.generate()
PUBLIC_PEM = SIGNER.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def bearer(tenant: str, user: str = "user-1", **claims: Any) -> dict[str, str]:
    now = int(time.time())
    body = {"iss": "librechat", "aud": "codeapi", "sub": user, "tenant_id": tenant, "iat": now, "exp": now + 300,
            **claims}  # fmt: skip

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signed = f"{b64(json.dumps({'alg': 'EdDSA', 'typ': 'JWT'}).encode())}.{b64(json.dumps(body).encode())}"
    return {"Authorization": f"Bearer {signed}.{b64(SIGNER.sign(signed.encode()))}"}


@pytest.fixture(scope="module")
def tenants() -> Iterator[ServerProcess]:
    with serving("interp-tenants-", CODEAPI_JWT_ENABLED="true", CODEAPI_JWT_PUBLIC_KEY=PUBLIC_PEM.decode()) as instance:
        yield instance


def test_a_tenant_sees_nothing_of_another_tenant_or_of_a_key(tenants: ServerProcess) -> None:
    alice, bob, key = bearer("tenant-a"), bearer("tenant-b"), tenants.headers
    code = "secret = 'alice'\n_ = open('a.txt', 'w').write('for alice')"
    run = httpx.post(f"{tenants.url}/exec", headers=alice, timeout=120, json={"lang": "py", "code": code}).json()
    sid, fid = run["session_id"], run["files"][0]["id"]
    for other in (bob, bearer("tenant-a", user="user-2"), key):  # another tenant, another user, an API key
        assert httpx.get(f"{tenants.url}/files/{sid}", headers=other, timeout=30).json() == []
        assert httpx.get(f"{tenants.url}/download/{sid}/{fid}", headers=other, timeout=30).status_code == 404
        assert httpx.delete(f"{tenants.url}/files/{sid}/{fid}", headers=other, timeout=30).status_code == 404
        stolen = httpx.post(f"{tenants.url}/exec", headers=other, timeout=120, json={
            "lang": "py", "code": "print(globals().get('secret'), __import__('os').listdir())", "session_id": sid,
            "files": [{"id": fid, "session_id": sid, "name": "a.txt"}]}).json()  # fmt: skip
        assert stolen["session_id"] != sid
        assert stolen["stdout"] == "None []\n"
    mine = httpx.post(f"{tenants.url}/exec", headers=alice, timeout=120,
                      json={"lang": "py", "code": "print(secret)", "session_id": sid}).json()  # fmt: skip
    assert mine["stdout"] == "alice\n"


def test_bad_tokens_are_401_and_keys_still_work(tenants: ServerProcess) -> None:
    for headers in (bearer("tenant-a", exp=int(time.time()) - 60), bearer("tenant-a", aud="elsewhere"),
                    {"Authorization": "Bearer not.a.token"}, {"Authorization": "Bearer x"}):  # fmt: skip
        response = httpx.post(f"{tenants.url}/exec", headers=headers, json={"lang": "bash", "code": "echo"}, timeout=30)
        assert response.status_code == 401
        assert response.json()["error_type"] == "authentication"
    assert tenants.exec("echo key", "bash")["stdout"] == "key\n"
