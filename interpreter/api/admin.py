"""The admin API (master key only): managed API keys in the reference server's shapes (its §3.9), run
statistics, and the package caches of the sandbox network.

Environment keys (API_KEY, API_KEYS) are listed with ``source: "environment"`` but cannot be changed
here (403); they are unlimited.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import trio
from pydantic import BaseModel, ConfigDict, Field, model_validator
from quart import Blueprint, Response, jsonify

from interpreter.api.app import current_deps
from interpreter.api.bodies import json_body
from interpreter.api.openapi import documented
from interpreter.auth.managed import PERIODS, PREFIX_SHOWN, KeyRecord, ManagedKeys
from interpreter.auth.principals import storage_prefix
from interpreter.egress.deps import empty_usage
from interpreter.errors import Conflict, Forbidden, NotFound, ServiceUnavailable

blueprint = Blueprint("admin", __name__, url_prefix="/api/v1/admin")


class RateLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_second: int | None = Field(None, ge=1)
    per_minute: int | None = Field(None, ge=1)
    hourly: int | None = Field(None, ge=1)
    daily: int | None = Field(None, ge=1)
    monthly: int | None = Field(None, ge=1)


class CreateKey(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    metadata: dict[str, str] = Field(default_factory=dict)


class PurgeDeps(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principal: str | None = Field(None, min_length=1, max_length=300, description="A principal id (env:..., key:...)")
    principal_prefix: str | None = Field(None, pattern="^[0-9a-f]{16}$", description="As GET lists them")

    @model_validator(mode="after")
    def _one_target(self) -> PurgeDeps:
        if self.principal is not None and self.principal_prefix is not None:
            raise ValueError("give principal or principal_prefix, not both (neither: every cache)")
        return self


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=200)
    enabled: bool | None = None
    rate_limits: RateLimits | None = Field(None, description="Replaces all five periods")


def _keys() -> ManagedKeys:
    keys = current_deps().keys
    if keys is None:
        raise ServiceUnavailable("Managed keys are not available")
    return keys


def _environment_hashes() -> set[str]:
    return {hashlib.sha256(key.encode()).hexdigest() for key in current_deps().settings.all_api_keys}


@blueprint.get("/keys")
@documented("List API keys (managed and environment), newest first", tag="admin")
async def list_keys() -> Response:
    keys = _keys()
    listed = [record.public(await keys.usage(record.key_hash)) for record in await keys.records()]
    for key in current_deps().settings.all_api_keys:
        digest = hashlib.sha256(key.encode()).hexdigest()
        listed.append(KeyRecord(digest, key[:PREFIX_SHOWN] if len(key) > 2 * PREFIX_SHOWN else "***", "environment",
                                source="environment").public())  # fmt: skip
    return jsonify(listed)


@blueprint.post("/keys")
@documented("Create a managed API key (the key is shown only in this reply)", tag="admin", body=CreateKey,
            errors={422: "Malformed body or limits"})  # fmt: skip
async def create_key() -> dict[str, Any]:
    body = await json_body(CreateKey)
    key, record = await _keys().create(body.name, body.rate_limits.model_dump(), body.metadata)
    return {"api_key": key, "record": record.public()}


async def _managed(key_hash: str) -> KeyRecord:
    if key_hash in _environment_hashes():
        raise Forbidden("Environment keys are managed through the environment")
    record = await _keys().get(key_hash)
    if record is None:
        raise NotFound("Key not found")
    return record


@blueprint.get("/stats")
@documented("Run statistics since start, the pool, and health (the reference's shape)", tag="admin")
async def stats() -> dict[str, Any]:
    from interpreter.api.metrics import reference_json  # a sibling blueprint's view of the same counters

    deps = current_deps()
    figures = reference_json()
    report = await deps.health.report()
    kernels = deps.python.pool.statistics() if deps.python is not None else {}
    return {
        "summary": figures["execution_statistics"],
        "by_language": figures["execution_statistics"]["by_language"],
        "pool_stats": {key: value for key, value in kernels.items() if key != "run_ids"},
        "health": {
            "status": report["status"],
            "services": {name: r["status"] for name, r in report["services"].items()},
        },
        "period_hours": round(figures["system_metrics"]["uptime_seconds"] / 3600, 3),
        "timestamp": datetime.now(UTC).isoformat(),
    }


@blueprint.patch("/keys/<key_hash>")
@documented("Rename, enable or disable a key, or replace its rate limits", tag="admin", body=UpdateKey,
            errors={403: "An environment key", 404: "Key not found", 422: "Malformed body or limits"})  # fmt: skip
async def update_key(key_hash: str) -> Response:
    record = await _managed(key_hash)
    body = await json_body(UpdateKey)
    if body.name is not None:
        record.name = body.name
    if body.enabled is not None:
        record.enabled = body.enabled
    if body.rate_limits is not None:
        record.rate_limits = {**dict.fromkeys(PERIODS), **body.rate_limits.model_dump()}
    await _keys().save(record)
    return jsonify(True)


@blueprint.delete("/keys/<key_hash>")
@documented("Revoke a managed key", tag="admin", errors={403: "An environment key", 404: "Key not found"})
async def delete_key(key_hash: str) -> Response:
    await _managed(key_hash)
    await _keys().delete(key_hash)
    return jsonify(True)


@blueprint.get("/skill-deps")
@documented("Package caches of the sandbox network: use per principal and per ecosystem", tag="admin")
async def skill_deps() -> dict[str, Any]:
    deps = current_deps()
    path = deps.settings.skill_deps_path
    report: dict[str, Any] = {"path": str(path), "enabled": deps.network is not None}
    if deps.network is None:
        return {**report, "exists": path.exists(), "limit_bytes_per_principal": None, **empty_usage()}
    usage = await trio.to_thread.run_sync(deps.network.deps.usage)
    return {**report, "exists": True, "limit_bytes_per_principal": deps.network.deps.max_bytes, **usage}


@blueprint.post("/skill-deps/purge")
@documented("Purge every package cache, or one principal's (jails using it keep it until they end)",
            tag="admin", body=PurgeDeps,
            errors={409: "The sandbox network is off", 415: "Not JSON", 422: "Malformed body"})  # fmt: skip
async def purge_skill_deps() -> dict[str, Any]:
    network = current_deps().network
    body = await json_body(PurgeDeps)
    if network is None:
        raise Conflict("The sandbox network is off (ENABLE_SANDBOX_NETWORK=false): there are no package caches")
    prefix = storage_prefix(body.principal) if body.principal is not None else body.principal_prefix
    return await network.deps.purge(prefix)
