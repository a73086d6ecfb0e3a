"""The HTTP surface of the foundation, against a real hypercorn server in-process."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from pydantic import BaseModel
from quart import Blueprint

from interpreter.api.bodies import json_body
from interpreter.errors import RateLimited
from sandboxes.nsjail import locate_nsjail
from tests.conftest import KEY_HEADERS, TEST_KEY, client, make_settings, running_server

MASTER = "master-key-for-tests-0123456789"
OTHER_KEY = "second-env-key-0123456789"
ENVELOPE_KEYS = {"error", "error_type", "details", "request_id", "timestamp"}

# Routes that only tests mount: a JSON body to validate and a typed 429.
probe = Blueprint("probe", __name__)


class Echo(BaseModel):
    code: str
    lang: str


@probe.post("/probe/echo")
async def echo() -> dict[str, str]:
    body = await json_body(Echo)
    return {"code": body.code}


@probe.get("/probe/limited")
async def limited() -> None:
    raise RateLimited("Rate limit exceeded for per_minute. Limit: 10, Used: 10", retry_after_s=42)


@probe.get("/probe/boom")
async def boom() -> None:
    raise RuntimeError("internal detail /etc/secret-path")


def assert_envelope(response: httpx.Response, status: int, error_type: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= ENVELOPE_KEYS
    assert body["error_type"] == error_type
    assert body["request_id"] == response.headers["x-request-id"]
    return dict(body)


def basic(key: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.fixture
async def base_url(work_dir: Path) -> AsyncIterator[str]:
    settings = make_settings(work_dir, MASTER_API_KEY=MASTER, API_KEYS=OTHER_KEY, API_DEBUG="true")
    async with running_server(settings, blueprints=(probe,)) as (url, _):
        yield url


async def test_health_is_public_and_reports_version(base_url: str) -> None:
    async with client(base_url) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert re.fullmatch(r"\d+\.\d+\.\d+", body["version"])
    assert body["uptime_seconds"] >= 0


async def test_every_route_answers_under_v1_except_admin(base_url: str) -> None:
    async with client(base_url) as http:
        assert (await http.get("/v1/health")).json()["status"] == "healthy"
        assert (await http.get("/v1/health/detailed", headers=KEY_HEADERS)).status_code == 200
        assert (await http.post("/v1/probe/echo", json={"code": "1", "lang": "py"}, headers=KEY_HEADERS)).json() == {
            "code": "1"
        }
        # /v1/api/v1/admin/... is no admin route: an ordinary unknown path, so the master key is not accepted.
        assert_envelope(await http.get("/v1/api/v1/admin/keys", headers=KEY_HEADERS), 404, "resource_not_found")
        assert_envelope(await http.get("/v1/api/v1/admin/keys", headers={"x-api-key": MASTER}), 401, "authentication")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (KEY_HEADERS, 200),
        ({"x-api-key": OTHER_KEY}, 200),  # API_KEYS works (the reference ignored it)
        (basic(TEST_KEY), 200),
        ({"authorization": "Basic " + base64.b64encode(f":{TEST_KEY}".encode()).decode()}, 200),
        ({"x-api-key": TEST_KEY, **basic("wrong-key-0000000000")}, 200),  # x-api-key wins
        ({"x-api-key": "wrong-key-0000000000", **basic(TEST_KEY)}, 401),
        ({"x-api-key": "wrong-key-0000000000"}, 401),
        ({"x-api-key": ""}, 401),
        ({"authorization": f"Bearer {TEST_KEY}"}, 401),
        ({"authorization": "Basic %%%"}, 401),
        ({"authorization": "Basic"}, 401),
        ({"x-api-key": MASTER}, 401),  # the master key is for admin routes only
    ],
)
async def test_user_route_auth_matrix(base_url: str, headers: dict[str, str], status: int) -> None:
    async with client(base_url) as http:
        response = await http.get("/health/detailed", headers=headers)
    if status == 200:
        assert response.status_code == 200
    else:
        body = assert_envelope(response, status, "authentication")
        assert TEST_KEY not in json.dumps(body)
        assert response.headers["www-authenticate"].startswith("Basic")


@pytest.mark.parametrize(
    ("headers", "status", "error_type"),
    [
        ({}, 401, "authentication"),
        ({"x-api-key": "nobody-0000000000000"}, 401, "authentication"),
        (KEY_HEADERS, 403, "authorization"),
        ({"x-api-key": MASTER}, 200, None),
        (basic(MASTER), 200, None),  # either header form
    ],
)
async def test_admin_auth_matrix(base_url: str, headers: dict[str, str], status: int, error_type: str | None) -> None:
    async with client(base_url) as http:
        response = await http.get("/api/v1/admin/keys", headers=headers)
    if error_type is None:
        assert response.status_code == status
        assert isinstance(response.json(), list)
    else:
        assert_envelope(response, status, error_type)


async def test_without_master_key_every_admin_route_is_403(work_dir: Path) -> None:
    async with running_server(make_settings(work_dir)) as (url, _), client(url) as http:
        for headers in ({}, KEY_HEADERS, {"x-api-key": "anything-000000000"}):
            for method in ("GET", "POST", "DELETE"):
                response = await http.request(method, "/api/v1/admin/keys", headers=headers, json={})
                assert_envelope(response, 403, "authorization")


async def test_auth_disabled_opens_user_routes_but_not_admin(work_dir: Path) -> None:
    settings = make_settings(work_dir, AUTH_ENABLED="false", MASTER_API_KEY=MASTER)
    async with running_server(settings) as (url, _), client(url) as http:
        assert (await http.get("/health/detailed")).status_code == 200
        assert_envelope(await http.get("/api/v1/admin/keys"), 401, "authentication")
        assert (await http.get("/api/v1/admin/keys", headers={"x-api-key": MASTER})).status_code == 200


async def test_unknown_route_and_wrong_method_use_the_envelope(base_url: str) -> None:
    async with client(base_url) as http:
        missing = await http.get("/no/such/route", headers=KEY_HEADERS)
        assert_envelope(missing, 404, "resource_not_found")
        wrong = await http.delete("/health/detailed", headers=KEY_HEADERS)
        assert_envelope(wrong, 405, "validation")
        assert "GET" in wrong.headers["allow"]
        options = await http.options("/health/detailed", headers=KEY_HEADERS)  # no CORS: OPTIONS is not a method
        assert_envelope(options, 405, "validation")


async def test_validation_errors_are_422_with_field_details(base_url: str) -> None:
    async with client(base_url, headers=KEY_HEADERS) as http:
        missing = await http.post("/probe/echo", json={"lang": "py"})
        body = assert_envelope(missing, 422, "validation")
        assert body["details"] == [{"field": "body -> code", "message": "Field required", "code": "missing"}]
        broken = await http.post("/probe/echo", content=b"{not json", headers={"content-type": "application/json"})
        body = assert_envelope(broken, 422, "validation")
        assert body["details"][0]["code"] == "json_invalid"  # type: ignore[index]


async def test_unsupported_content_type_is_415(base_url: str) -> None:
    async with client(base_url, headers=KEY_HEADERS) as http:
        gate = await http.post("/probe/echo", content=b"<xml/>", headers={"content-type": "application/xml"})
        assert_envelope(gate, 415, "validation")
        none = await http.post("/probe/echo", content=b"{}", headers={"content-type": ""})
        assert_envelope(none, 415, "validation")
        form = await http.post("/probe/echo", data={"code": "x"})  # accepted by the gate, not by a JSON route
        assert_envelope(form, 415, "validation")


async def test_rate_limited_form_carries_retry_after(base_url: str) -> None:
    async with client(base_url, headers=KEY_HEADERS) as http:
        response = await http.get("/probe/limited")
    body = assert_envelope(response, 429, "rate_limited")
    assert body["retry_after_seconds"] == 42
    assert response.headers["retry-after"] == "42"


async def test_unexpected_errors_are_500_without_internals(base_url: str) -> None:
    async with client(base_url, headers=KEY_HEADERS) as http:
        response = await http.get("/probe/boom")
        body = assert_envelope(response, 500, "internal_server")
        assert body["error"] == "An unexpected error occurred"
        assert "secret-path" not in response.text
        assert (await http.get("/health")).status_code == 200  # and the server carries on


async def test_body_cap_by_content_length_and_while_streaming(work_dir: Path) -> None:
    settings = make_settings(work_dir, MAX_REQUEST_JSON_MB="0.001")  # 1048 bytes
    big = json.dumps({"code": "x" * 5000, "lang": "py"}).encode()
    async with running_server(settings, blueprints=(probe,)) as (url, _), client(url, headers=KEY_HEADERS) as http:
        declared = await http.post("/probe/echo", content=big, headers={"content-type": "application/json"})
        assert_envelope(declared, 413, "resource_exhausted")

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        streamed = await http.post("/probe/echo", content=chunks(), headers={"content-type": "application/json"})
        assert_envelope(streamed, 413, "resource_exhausted")
        small = await http.post("/probe/echo", json={"code": "ok", "lang": "py"})
        assert small.json() == {"code": "ok"}


async def test_security_headers_and_request_id_on_every_response(base_url: str) -> None:
    async with client(base_url) as http:
        for response in (
            await http.get("/health"),
            await http.get("/health/detailed"),
            await http.get("/nope"),
        ):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "default-src 'self'" in response.headers["content-security-policy"]
            assert len(response.headers["x-request-id"]) == 21
            assert "strict-transport-security" not in response.headers  # plain HTTP
        traced = await http.get("/health", headers={"x-request-id": "upstream-trace-42"})
        assert traced.headers["x-request-id"] == "upstream-trace-42"
        hostile = await http.get("/health", headers={"x-request-id": "<script>alert(1)</script>"})
        assert len(hostile.headers["x-request-id"]) == 21  # not echoed: replaced by a fresh id


async def test_detailed_health_shape(base_url: str) -> None:
    async with client(base_url, headers=KEY_HEADERS) as http:
        body = (await http.get("/health/detailed")).json()
    assert set(body) == {"status", "timestamp", "services", "summary"}
    assert body["status"] in ("healthy", "degraded")
    assert {"nsjail", "services", "security", "sandbox", "kv", "blobs"} <= set(body["services"])
    assert body["services"]["kv"]["details"] == {"backend": "sqlite"}  # the embedded default
    assert body["services"]["blobs"]["details"] == {"backend": "dir"}
    nsjail = body["services"]["nsjail"]
    assert {"service", "status", "timestamp", "response_time_ms"} <= set(nsjail)
    assert nsjail["status"] == "healthy"
    assert body["summary"]["total_services"] == len(body["services"])


async def test_detailed_health_is_503_when_nsjail_disappears(work_dir: Path) -> None:
    copy = work_dir / "nsjail-copy"
    shutil.copy2(locate_nsjail(), copy)
    settings = make_settings(work_dir, NSJAIL_BINARY=str(copy))
    async with running_server(settings) as (url, _), client(url, headers=KEY_HEADERS) as http:
        assert (await http.get("/health/detailed")).status_code == 200
        copy.unlink()
        response = await http.get("/health/detailed")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy"  # the health shape, not the envelope
        assert body["services"]["nsjail"]["error"] == "nsjail binary not found"
        assert str(work_dir) not in response.text
        assert (await http.get("/health")).status_code == 200


async def test_security_posture_degrades_health(work_dir: Path) -> None:
    settings = make_settings(work_dir, ENABLE_NETWORK_ISOLATION="false")
    async with running_server(settings) as (url, _), client(url, headers=KEY_HEADERS) as http:
        response = await http.get("/health/detailed")
    assert response.status_code == 200
    assert response.headers["x-health-status"] == "degraded"
    security = response.json()["services"]["security"]
    assert security["status"] == "degraded"
    assert any("ENABLE_NETWORK_ISOLATION" in w for w in security["details"]["warnings"])


async def test_config_needs_api_debug_and_a_key_and_hides_secrets(base_url: str, other_dir: Path) -> None:
    async with client(base_url) as http:
        assert_envelope(await http.get("/config"), 401, "authentication")
        response = await http.get("/config", headers=KEY_HEADERS)
    assert response.status_code == 200
    settings = response.json()["settings"]
    assert settings["API_KEY"] == "***"
    assert settings["MASTER_API_KEY"] == "***"
    assert TEST_KEY not in response.text
    assert MASTER not in response.text
    assert OTHER_KEY not in response.text
    off = make_settings(other_dir)  # a second instance needs its own SANDBOX_BASE_DIR (instance lock)
    async with running_server(off) as (url, _), client(url, headers=KEY_HEADERS) as http:
        assert_envelope(await http.get("/config"), 404, "resource_not_found")


async def test_docs_and_openapi(base_url: str, other_dir: Path) -> None:
    async with client(base_url) as http:
        spec = (await http.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.")
        assert "/health" in spec["paths"]
        detailed = spec["paths"]["/health/detailed"]["get"]
        assert detailed["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/DetailedHealth")
        assert "ErrorEnvelope" in spec["components"]["schemas"]
        page = await http.get("/docs")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "cdn" not in page.text.lower()
        script = await http.get("/docs/docs.js")
        assert script.status_code == 200
        assert "/openapi.json" in script.text
    async with running_server(make_settings(other_dir, ENABLE_DOCS="false")) as (url, _), client(url) as http:
        assert (await http.get("/openapi.json")).status_code in (401, 404)
        assert (await http.get("/docs", headers=KEY_HEADERS)).status_code == 404


async def test_cors_off_by_default(base_url: str) -> None:
    async with client(base_url) as http:
        response = await http.get("/health", headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_with_listed_origins(work_dir: Path) -> None:
    settings = make_settings(work_dir, ENABLE_CORS="true", CORS_ORIGINS="https://app.example,https://b.example")
    async with running_server(settings) as (url, _), client(url) as http:
        preflight = await http.options(
            "/health/detailed",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "GET",
                "access-control-request-headers": "x-api-key",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "x-api-key" in preflight.headers["access-control-allow-headers"]
        simple = await http.get("/health", headers={"origin": "https://b.example"})
        assert simple.headers["access-control-allow-origin"] == "https://b.example"
        assert "Content-Disposition" in simple.headers["access-control-expose-headers"]
        stranger = await http.get("/health", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers


async def test_cors_without_origins_allows_any_origin_without_credentials(work_dir: Path) -> None:
    async with running_server(make_settings(work_dir, ENABLE_CORS="true")) as (url, _), client(url) as http:
        response = await http.get("/health", headers={"origin": "https://any.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


async def test_many_concurrent_requests_and_garbage_do_not_hurt(base_url: str) -> None:
    async def hit(http: httpx.AsyncClient) -> None:
        assert (await http.get("/health")).status_code == 200

    async with client(base_url) as http, trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(hit, http)
    host, port = base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        with trio.move_on_after(5):
            await stream.receive_some(1024)
    async with client(base_url) as http:
        assert (await http.get("/health")).status_code == 200
