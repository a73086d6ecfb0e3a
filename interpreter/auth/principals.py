"""Principals: the owner of every session, file, state and token (DESIGN §9)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

PrincipalKind = Literal["env", "key", "jwt", "anonymous", "master"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-principal rate limits; ``None`` means unlimited (env keys are unlimited)."""

    per_second: int | None = None
    per_minute: int | None = None
    hourly: int | None = None
    daily: int | None = None
    monthly: int | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    kind: PrincipalKind
    limits: Limits = field(default_factory=Limits)

    @property
    def storage_prefix(self) -> str:
        return storage_prefix(self.id)


def storage_prefix(principal_id: str) -> str:
    """The hash every KV and blob key of a principal starts with (DESIGN §4)."""
    return hashlib.sha256(principal_id.encode()).hexdigest()[:16]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def env_principal(key: str) -> Principal:
    return Principal(id=f"env:{key_hash(key)[:16]}", kind="env")


ANONYMOUS = Principal(id="anonymous", kind="anonymous")
MASTER = Principal(id="master", kind="master")
