"""LibreChat's code-API tokens (DESIGN §9): ``Authorization: Bearer <JWT>`` instead of a key.

Accepted: EdDSA (Ed25519) and RS256 only, each verified with a key of its own type (so an RS256
token can never be checked against an Ed25519 key, nor an ``HS256`` one against a public key used as
an HMAC secret; ``alg: none`` is refused). The key comes from CODEAPI_JWT_PUBLIC_KEY (PEM text or a
path) or a key set (CODEAPI_JWT_JWKS_FILE, CODEAPI_JWT_JWKS_URL), chosen by ``kid``. Claims: ``iss`` and
``aud`` as configured, ``exp`` required and at most MAX_LIFETIME_S after ``iat``, ``nbf`` honoured, a
small leeway for clocks; ``tenant_id`` and ``sub`` required. The principal is ``jwt:<tenant_id>:<sub>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from interpreter.auth.principals import Principal
from interpreter.errors import AuthenticationFailed, SettingsError

log = logging.getLogger("interpreter.auth")

PublicKey = Ed25519PublicKey | RSAPublicKey
LEEWAY_S = 30
MAX_LIFETIME_S = 300
MAX_TOKEN_BYTES = 8192
CLAIM_MAX = 256
JWKS_TIMEOUT_S = 5
JWKS_REFRESH_S = 300


class InvalidToken(AuthenticationFailed):
    message = "Invalid token"


def _b64(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("Malformed token") from None


def _b64_int(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url string")
    return int.from_bytes(_b64(value), "big")


def key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """A public key from one JWK (OKP/Ed25519 or RSA). Raises ValueError for anything else."""
    if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
        return Ed25519PublicKey.from_public_bytes(_b64(str(jwk.get("x", ""))))
    if jwk.get("kty") == "RSA":
        return RSAPublicNumbers(_b64_int(jwk.get("e")), _b64_int(jwk.get("n"))).public_key()
    raise ValueError(f"unsupported key type {str(jwk.get('kty'))[:20]}")


def keys_from_jwks(document: object) -> dict[str, PublicKey]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS document is an object with a 'keys' list")
    keys = {}
    for jwk in document["keys"]:
        if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig":
            keys[str(jwk.get("kid", ""))] = key_from_jwk(jwk)
    return keys


def key_from_pem(text_or_path: str) -> PublicKey:
    text = text_or_path
    if "-----BEGIN" not in text:
        text = Path(text_or_path).read_text()
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, Ed25519PublicKey | RSAPublicKey):
        raise ValueError("the public key must be Ed25519 or RSA")
    return key


@dataclass
class JwtVerifier:
    issuer: str
    audience: str
    static_key: PublicKey | None = None  # CODEAPI_JWT_PUBLIC_KEY: any kid
    key_set: dict[str, PublicKey] = field(default_factory=dict)  # JWKS: by kid
    jwks_url: str | None = None
    now: Callable[[], float] = time.time

    def refresh(self) -> None:
        """Fetch CODEAPI_JWT_JWKS_URL again (blocking: call it in a thread). Keeps the old set on failure."""
        if self.jwks_url is None:
            return
        try:
            with urllib.request.urlopen(self.jwks_url, timeout=JWKS_TIMEOUT_S) as response:
                self.key_set = keys_from_jwks(json.loads(response.read(1 << 20)))
        except (OSError, ValueError) as exc:
            log.warning("could not refresh the JWT key set", extra={"fields": {"error": type(exc).__name__}})

    def _key(self, kid: object) -> PublicKey:
        if isinstance(kid, str) and kid in self.key_set:
            return self.key_set[kid]
        if self.static_key is not None:
            return self.static_key
        raise InvalidToken("Unknown signing key")

    def principal(self, token: str) -> Principal:
        """The principal of a valid token.

        Raises:
            InvalidToken: anything wrong with it (format, algorithm, signature, claims).
        """
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise InvalidToken("Malformed token")
        header_b64, payload_b64, signature_b64 = token.split(".")
        try:
            header = json.loads(_b64(header_b64))
            claims = json.loads(_b64(payload_b64))
        except ValueError:
            raise InvalidToken("Malformed token") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise InvalidToken("Malformed token")
        self._verify(header, f"{header_b64}.{payload_b64}".encode(), _b64(signature_b64))
        self._check_claims(claims)
        return Principal(id=f"jwt:{claims['tenant_id']}:{claims['sub']}", kind="jwt")

    def _verify(self, header: dict[str, Any], signed: bytes, signature: bytes) -> None:
        algorithm = header.get("alg")
        key = self._key(header.get("kid"))
        try:
            if algorithm == "EdDSA" and isinstance(key, Ed25519PublicKey):
                key.verify(signature, signed)
            elif algorithm == "RS256" and isinstance(key, RSAPublicKey):
                key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise InvalidToken("Unsupported token algorithm")  # none, HS*, or not this key's type
        except InvalidSignature:
            raise InvalidToken("Invalid token signature") from None

    def _check_claims(self, claims: dict[str, Any]) -> None:
        now = self.now()
        if claims.get("iss") != self.issuer:
            raise InvalidToken("Token issuer not accepted")
        audience = claims.get("aud")
        if audience != self.audience and not (isinstance(audience, list) and self.audience in audience):
            raise InvalidToken("Token audience not accepted")
        expires, issued, not_before = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if not isinstance(expires, int | float) or expires + LEEWAY_S < now:
            raise InvalidToken("Token expired")
        if isinstance(not_before, int | float) and not_before - LEEWAY_S > now:
            raise InvalidToken("Token not valid yet")
        if not isinstance(issued, int | float) or issued - LEEWAY_S > now or expires - issued > MAX_LIFETIME_S:
            raise InvalidToken("Token lifetime not accepted")
        for claim in ("tenant_id", "sub"):
            value = claims.get(claim)
            if not isinstance(value, str) or not value or len(value) > CLAIM_MAX:
                raise InvalidToken(f"Token has no valid {claim}")


async def refresh_forever(verifier: JwtVerifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                          ) -> NoReturn:  # fmt: skip
    """The JWKS URL's service: fetched before ready, then every JWKS_REFRESH_S (keys rotate)."""
    while True:
        await trio.to_thread.run_sync(verifier.refresh)
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        await trio.sleep(JWKS_REFRESH_S)


def verifier_from_settings(enabled: bool, public_key: str | None, jwks_file: Path | None, jwks_url: str | None,
                           issuer: str, audience: str) -> JwtVerifier | None:  # fmt: skip
    """The verifier CODEAPI_JWT_* describe, None when disabled.

    Raises:
        SettingsError: enabled without a key, or a key that cannot be read.
    """
    if not enabled:
        return None
    if not (public_key or jwks_file or jwks_url):
        raise SettingsError(
            "CODEAPI_JWT_ENABLED: set CODEAPI_JWT_PUBLIC_KEY, CODEAPI_JWT_JWKS_FILE or CODEAPI_JWT_JWKS_URL"
        )
    verifier = JwtVerifier(issuer=issuer, audience=audience, jwks_url=jwks_url)
    try:
        if public_key:
            verifier.static_key = key_from_pem(public_key)
        if jwks_file is not None:
            verifier.key_set = keys_from_jwks(json.loads(jwks_file.read_text()))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"CODEAPI_JWT: cannot read the public key ({type(exc).__name__}: {exc})") from None
    return verifier
