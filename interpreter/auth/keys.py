"""API keys from the request headers, checked against the configured keys in constant time.

How a key is presented (configuration guide): ``x-api-key``, or HTTP Basic with the key as the
username and an empty password; ``x-api-key`` wins when both are present. Managed keys and JWTs
plug in as further ``Authenticator`` steps (access-control issue).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from interpreter.auth.jwt import JwtVerifier
from interpreter.auth.principals import ANONYMOUS, MASTER, Principal, env_principal
from interpreter.errors import AuthenticationFailed, Forbidden


class Headers(Protocol):
    """What we read of request headers (Quart's ``Headers`` and a plain dict both fit)."""

    def get(self, key: str, /) -> str | None: ...


class UnknownKey(AuthenticationFailed):
    """Not an environment key: a managed key, or nothing (the caller asks the managed keys)."""

    def __init__(self, key: str) -> None:
        super().__init__("Invalid API key")
        self.key = key


class MalformedCredentials(AuthenticationFailed):
    message = "Malformed Authorization header"


def extract_key(headers: Headers) -> str | None:
    """The presented key, ``None`` when nothing was presented.

    Raises:
        AuthenticationFailed: an unsupported scheme, malformed Basic credentials or an empty key.
    """
    header_key = headers.get("x-api-key")
    if header_key is not None:
        if not header_key.strip():
            raise AuthenticationFailed("API key is empty")
        return header_key.strip()
    authorization = headers.get("authorization")
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise AuthenticationFailed(f"Unsupported authorization scheme: {scheme[:20] or 'empty'}")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise MalformedCredentials("Malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise MalformedCredentials("Malformed Basic credentials: expected <key>:")
    key = username or password  # the key goes in the username; a lone password is accepted too
    if not key:
        raise AuthenticationFailed("API key is empty")
    return key


def _matches(presented: str, candidates: Sequence[str]) -> str | None:
    """The candidate equal to ``presented``; every candidate is compared, in constant time each."""
    found = None
    presented_b = presented.encode()
    for candidate in candidates:
        if hmac.compare_digest(presented_b, candidate.encode()):
            found = candidate
    return found


@dataclass(frozen=True)
class KeyAuthenticator:
    """Authenticates user routes against API_KEY/API_KEYS and admin routes against MASTER_API_KEY."""

    env_keys: tuple[str, ...]
    master_key: str | None
    auth_enabled: bool = True
    jwt: JwtVerifier | None = None  # CODEAPI_JWT_ENABLED: Bearer tokens beside keys

    def user(self, headers: Headers) -> Principal:
        if not self.auth_enabled:
            return ANONYMOUS
        authorization = headers.get("authorization")
        if self.jwt is not None and authorization and headers.get("x-api-key") is None:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                return self.jwt.principal(token.strip())
        key = extract_key(headers)
        if key is None:
            raise AuthenticationFailed("API key is required")
        matched = _matches(key, self.env_keys)
        if matched is None:
            raise UnknownKey(key)
        return env_principal(matched)

    def admin(self, headers: Headers) -> Principal:
        # Always checked, whatever AUTH_ENABLED says; no master key configured means no admin at all.
        if self.master_key is None:
            raise Forbidden("Admin operations are disabled (no MASTER_API_KEY configured)")
        key = extract_key(headers)
        if key is None:
            raise AuthenticationFailed("API key is required")
        if _matches(key, (self.master_key,)) is not None:
            return MASTER
        if _matches(key, self.env_keys) is not None:
            raise Forbidden("This route needs the master API key")
        raise AuthenticationFailed("Invalid API key")
