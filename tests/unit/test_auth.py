"""Key extraction and the key matrix of the configuration guide, without HTTP."""

from __future__ import annotations

import base64

import pytest

from interpreter.auth.keys import KeyAuthenticator, extract_key
from interpreter.auth.principals import ANONYMOUS, MASTER, env_principal, key_hash
from interpreter.errors import AuthenticationFailed, Forbidden

K1, K2, MASTER_KEY = "key-one-1234567890", "key-two-1234567890", "master-1234567890"


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-api-key": K1}, K1),
        ({"authorization": basic(f"{K1}:")}, K1),
        ({"authorization": basic(f":{K1}")}, K1),  # a lone password is accepted too
        ({"authorization": "basic " + base64.b64encode(f"{K1}:".encode()).decode()}, K1),  # scheme is case-insensitive
        ({"x-api-key": K1, "authorization": basic(f"{K2}:")}, K1),  # x-api-key wins
    ],
)
def test_extract_key(headers: dict[str, str], expected: str | None) -> None:
    assert extract_key(headers) == expected


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"authorization": "Bearer abc"}, "Unsupported authorization scheme"),
        ({"authorization": "Digest abc"}, "Unsupported authorization scheme"),
        ({"authorization": "Basic !!!notbase64"}, "Malformed Basic credentials"),
        ({"authorization": basic("no-colon")}, "Malformed Basic credentials"),
        ({"authorization": "Basic " + base64.b64encode(b"\xff\xfe:").decode()}, "Malformed Basic credentials"),
        ({"authorization": basic(":")}, "API key is empty"),
        ({"x-api-key": ""}, "API key is empty"),
        ({"x-api-key": "   "}, "API key is empty"),
    ],
)
def test_bad_credentials_are_401(headers: dict[str, str], message: str) -> None:
    with pytest.raises(AuthenticationFailed, match=message):
        extract_key(headers)


def test_user_keys_yield_env_principals() -> None:
    auth = KeyAuthenticator((K1, K2), MASTER_KEY)
    assert auth.user({"x-api-key": K2}) == env_principal(K2)
    assert auth.user({"x-api-key": K1}).id == f"env:{key_hash(K1)[:16]}"
    assert auth.user({"x-api-key": K1}) != auth.user({"x-api-key": K2})
    with pytest.raises(AuthenticationFailed, match="Invalid API key"):
        auth.user({"x-api-key": K1 + "x"})
    with pytest.raises(AuthenticationFailed, match="required"):
        auth.user({})
    with pytest.raises(AuthenticationFailed, match="Invalid API key"):
        auth.user({"x-api-key": MASTER_KEY})  # the master key is not a user key


def test_wrong_x_api_key_does_not_fall_back_to_basic() -> None:
    auth = KeyAuthenticator((K1,), None)
    with pytest.raises(AuthenticationFailed):
        auth.user({"x-api-key": "wrong-key-000000000", "authorization": basic(f"{K1}:")})


def test_auth_disabled_opens_user_routes_only() -> None:
    auth = KeyAuthenticator((K1,), MASTER_KEY, auth_enabled=False)
    assert auth.user({}) == ANONYMOUS
    with pytest.raises(AuthenticationFailed):
        auth.admin({})
    assert auth.admin({"authorization": basic(f"{MASTER_KEY}:")}) == MASTER


def test_admin_matrix() -> None:
    auth = KeyAuthenticator((K1,), MASTER_KEY)
    assert auth.admin({"x-api-key": MASTER_KEY}) == MASTER
    with pytest.raises(Forbidden):
        auth.admin({"x-api-key": K1})  # authenticated, but not allowed
    with pytest.raises(AuthenticationFailed):
        auth.admin({"x-api-key": "nobody-knows-this-key"})
    with pytest.raises(Forbidden, match="no MASTER_API_KEY"):
        KeyAuthenticator((K1,), None).admin({"x-api-key": K1})


def test_principal_storage_prefix_is_stable_and_distinct() -> None:
    one, two = env_principal(K1), env_principal(K2)
    assert one.storage_prefix == env_principal(K1).storage_prefix
    assert one.storage_prefix != two.storage_prefix
    assert len(one.storage_prefix) == 16
