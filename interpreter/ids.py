"""Identifiers: 21-character nanoids, as LibreChat expects of session and file ids."""

from __future__ import annotations

import re
import secrets
from typing import TypeGuard

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-"
NANOID = re.compile(r"^[A-Za-z0-9_-]{21}$")


def new_id() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(21))


def is_id(value: object) -> TypeGuard[str]:
    """True for a well-formed id; anything else never reaches a store key."""
    return isinstance(value, str) and NANOID.match(value) is not None
