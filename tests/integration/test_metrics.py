"""``/metrics``: Prometheus text with the families operators need, the reference's JSON, and its auth."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KEY_HEADERS, client, make_settings, running_server

pytestmark = pytest.mark.nsjail


async def test_prometheus_text_counts_requests_runs_and_failures(work_dir: Path) -> None:
    async with running_server(make_settings(work_dir)) as (url, _), client(url) as http:
        assert (await http.get("/metrics")).status_code == 401  # a key by default
        await http.get("/health")
        run = await http.post("/exec", headers=KEY_HEADERS, json={"lang": "bash", "code": "exit 3"})
        assert run.json()["status"] == "error"
        await http.get("/files/x", headers={"x-api-key": "wrong-key-000000000000"})
        text = await http.get("/metrics", headers=KEY_HEADERS)
        assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
        body = text.text
        assert 'interpreter_http_requests_total{route="/health",status="200"} 1' in body
        assert 'interpreter_runs_total{language="bash",status="error"} 1' in body
        assert 'interpreter_run_duration_seconds_count{language="bash"} 1' in body
        assert 'interpreter_run_duration_seconds_bucket{language="bash",le="+Inf"} 1' in body
        assert "interpreter_auth_failures_total 2" in body  # the keyless /metrics and the wrong key
        assert "interpreter_runs_queued 0" in body
        assert 'interpreter_kernels{state="live"}' in body
        reference = (await http.get("/metrics", headers={**KEY_HEADERS, "accept": "application/json"})).json()
        assert set(reference) == {"execution_statistics", "api_statistics", "system_metrics"}
        assert reference["execution_statistics"]["failed_executions"] == 1
        assert set(reference["system_metrics"]) >= {"counters", "gauges", "buffer_size", "uptime_seconds"}


async def test_metrics_can_be_public(work_dir: Path) -> None:
    async with running_server(make_settings(work_dir, METRICS_AUTH_ENABLED="false")) as (url, _), client(url) as http:
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/health/detailed")).status_code == 401  # only /metrics
