"""LibreChat JWT verification: the tokens it signs are accepted, every forgery and misuse is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import socketserver
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from interpreter.auth.jwt import InvalidToken, JwtVerifier, keys_from_jwks, verifier_from_settings
from interpreter.errors import SettingsError

ED_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NOW = 1_800_000_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims: dict[str, Any] | None = None, *, alg: str = "EdDSA", kid: str | None = "ed", key: Any = ED_KEY,
          header: dict[str, Any] | None = None, **changes: Any) -> str:  # fmt: skip
    body = {"iss": "librechat", "aud": "codeapi", "sub": "user-1", "tenant_id": "tenant-a", "iat": NOW,
            "exp": NOW + 300, **(claims or {}), **changes}  # fmt: skip
    head = header or {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signed = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}".encode()
    if alg == "EdDSA":
        signature = key.sign(signed)
    elif alg == "RS256":
        signature = key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "HS256":
        signature = hmac.new(key, signed, hashlib.sha256).digest()
    else:
        signature = b""
    return f"{signed.decode()}.{b64(signature)}"


def jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw), "kid": kid}
    numbers = public.public_numbers()
    return {"kty": "RSA", "kid": kid, "n": b64(numbers.n.to_bytes(256, "big")), "e": b64(numbers.e.to_bytes(3, "big"))}


@pytest.fixture
def verifier() -> JwtVerifier:
    keys = keys_from_jwks({"keys": [jwk(ED_KEY, "ed"), jwk(RSA_KEY, "rsa")]})
    return JwtVerifier(issuer="librechat", audience="codeapi", key_set=keys, now=lambda: NOW + 10)


def test_eddsa_and_rs256_tokens_become_per_tenant_principals(verifier: JwtVerifier) -> None:
    assert verifier.principal(token()).id == "jwt:tenant-a:user-1"
    rs = token(alg="RS256", kid="rsa", key=RSA_KEY, tenant_id="tenant-b", sub="user-9")
    assert verifier.principal(rs).id == "jwt:tenant-b:user-9"
    assert verifier.principal(token(aud=["other", "codeapi"])).kind == "jwt"


RSA_PEM = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
OTHER_ED = ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize(
    "forged",
    [
        token(exp=NOW - 100, iat=NOW - 200),  # expired
        token(nbf=NOW + 3600, iat=NOW, exp=NOW + 300),  # not valid yet
        token(iat=NOW + 3600, exp=NOW + 3700),  # issued in the future
        token(exp=NOW + 3600),  # lives longer than 300 s
        token(aud="someone-else"),
        token(iss="not-librechat"),
        token(key=OTHER_ED),  # signed by another key
        token(alg="none", header={"alg": "none", "typ": "JWT", "kid": "ed"}),
        token(alg="HS256", kid="rsa", key=RSA_PEM),  # HS/RS confusion: the public key used as an HMAC secret
        token(alg="RS256", kid="ed", key=RSA_KEY),  # an RS256 token checked against the Ed25519 key
        token(alg="EdDSA", kid="unknown"),
        token(tenant_id=None),
        token(sub=""),
        token(exp="soon"),
        "not.a.token",
        "only-one-part",
        token()[:-4] + "AAAA",  # a tampered signature
    ],
    ids=["expired", "nbf", "future-iat", "too-long", "audience", "issuer", "wrong-key", "alg-none",
         "hs-rs-confusion", "alg-key-mismatch", "unknown-kid", "no-tenant", "empty-sub", "exp-not-a-number",
         "garbage", "one-part", "tampered"],
)  # fmt: skip
def test_forged_or_misused_tokens_are_refused(verifier: JwtVerifier, forged: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        verifier.principal(forged)
    assert refused.value.status == 401


def test_a_static_pem_key_from_text_or_a_path(tmp_path: Path) -> None:
    pem = ED_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    for source in (pem.decode(), str(path)):
        verifier = verifier_from_settings(True, source, None, None, "librechat", "codeapi")
        assert verifier is not None
        verifier.now = lambda: NOW
        assert verifier.principal(token(kid=None)).id == "jwt:tenant-a:user-1"
    with pytest.raises(SettingsError):
        verifier_from_settings(True, None, None, None, "librechat", "codeapi")
    with pytest.raises(SettingsError):
        verifier_from_settings(True, "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----", None, None,
                               "librechat", "codeapi")  # fmt: skip
    assert verifier_from_settings(False, None, None, None, "librechat", "codeapi") is None


def test_a_jwks_url_is_fetched_and_refreshed_when_keys_rotate() -> None:
    served = {"keys": [jwk(ED_KEY, "first")]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(served).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
            verifier = verifier_from_settings(True, None, None, url, "librechat", "codeapi")
            assert verifier is not None
            verifier.now = lambda: NOW
            verifier.refresh()
            assert verifier.principal(token(kid="first")).id == "jwt:tenant-a:user-1"
            with pytest.raises(InvalidToken):
                verifier.principal(token(kid="second", key=RSA_KEY, alg="RS256"))
            served["keys"] = [jwk(RSA_KEY, "second")]  # LibreChat rotated its key
            verifier.refresh()
            assert verifier.principal(token(kid="second", key=RSA_KEY, alg="RS256")).kind == "jwt"
        finally:
            server.shutdown()
