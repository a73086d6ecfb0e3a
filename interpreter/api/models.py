"""Response models shared by several routes (and the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    field: str
    message: str
    code: str


class ErrorEnvelope(BaseModel):
    """Every non-2xx response (DESIGN §8)."""

    error: str = Field(description="Human-readable message")
    error_type: str = Field(description="validation, authentication, authorization, resource_not_found, ...")
    details: list[ErrorDetail] | None = None
    request_id: str | None = None
    timestamp: float
    retry_after_seconds: int | None = Field(None, description="Only on 429")


class Health(BaseModel):
    status: Literal["healthy"]
    version: str
    uptime_seconds: float
    service: str = "code-interpreter-api"


class ServiceHealth(BaseModel):
    service: str
    status: Literal["healthy", "degraded", "unhealthy"]
    timestamp: str
    response_time_ms: float | None = None
    details: dict[str, Any] | None = None
    error: str | None = None


class HealthSummary(BaseModel):
    total_services: int
    healthy_services: int
    degraded_services: int
    unhealthy_services: int


class DetailedHealth(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    timestamp: str
    services: dict[str, ServiceHealth]
    summary: HealthSummary
