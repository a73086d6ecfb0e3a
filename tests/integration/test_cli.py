"""The command line: --version, doctor, and logs of a real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from interpreter import __version__
from interpreter.doctor import cargo_version, check_kernel_mode, check_sandbox_network, collect
from interpreter.egress.service import missing_tools
from interpreter.resources import sandboxes_dir
from interpreter.settings import load_settings
from tests.conftest import TEST_KEY, ServerProcess, cli_env, free_port, make_settings

INTERPRETER = [sys.executable, "-m", "interpreter"]


def test_version() -> None:
    result = subprocess.run([*INTERPRETER, "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == f"interpreter {__version__}"


def test_no_command_prints_help_and_fails() -> None:
    result = subprocess.run(INTERPRETER, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "serve" in result.stdout
    assert "doctor" in result.stdout


@pytest.mark.nsjail
def test_doctor_runs_a_real_jail_and_reports_each_runtime(work_dir: Path) -> None:
    settings = make_settings(work_dir)
    findings = {
        f.check: f
        for f in collect(settings, languages_dir=sandboxes_dir() / "languages", sandbox_venv=settings.sandbox_venv)
    }
    assert findings["nsjail"].level == "ok"
    assert findings["namespaces"].level == "ok", findings["namespaces"].message
    assert findings["cgroups"].level == "ok", findings["cgroups"].message
    assert findings["kernel mode"].message.startswith("zygote: KERNEL_MODE=auto: kernels are forked")
    runtimes = {check for check in findings if check.startswith("runtime ")}
    assert runtimes == {
        f"runtime {code}" for code in ["py", "js", "ts", "go", "java", "c", "cpp", "php", "rs", "r", "f90", "d", "bash"]
    }
    if os.environ.get("CI") == "true":  # the install script puts every runtime in place
        missing = {check: f.message for check, f in findings.items() if f.level == "fail"}
        assert missing == {}


def test_doctor_explains_the_kernel_mode_chosen() -> None:
    explained = {mode: next(check_kernel_mode(load_settings({"KERNEL_MODE": mode}, env_file=None)))
                 for mode in ("auto", "zygote", "nsjail")}  # fmt: skip
    assert [explained[mode].level for mode in ("auto", "zygote", "nsjail")] == ["ok", "ok", "ok"]
    assert explained["nsjail"].message.startswith("nsjail: KERNEL_MODE=nsjail: a fresh nsjail per kernel")


def test_doctor_shows_the_effective_allowlist_of_the_sandbox_network() -> None:
    off = list(check_sandbox_network(load_settings({}, env_file=None)))
    assert [(f.level, f.message) for f in off] == [
        ("ok", "off (ENABLE_SANDBOX_NETWORK=false): sandboxes have no network")]  # fmt: skip
    settings = load_settings({"ENABLE_SANDBOX_NETWORK": "true", "SANDBOX_EGRESS_ALLOWLIST": ".corp.example"},
                             env_file=None)  # fmt: skip
    found = list(check_sandbox_network(settings, {"PIP_INDEX_URL": "https://pypi.corp.example/simple",
                                                  "PIP_EXTRA_INDEX_URL": "file:///opt/wheels"}))  # fmt: skip
    allowed = found[0].message
    assert "pypi.corp.example" in allowed
    assert ".corp.example" in allowed
    assert "registry.npmjs.org" in allowed
    assert "pypi.org" not in allowed.replace("pypi.corp", "")  # the mirror replaces PyPI
    assert found[1].level == "warn"
    assert "file:///opt/wheels" in found[1].message
    # Debian 12's cargo (1.65) predates the sparse index: doctor says what cargo install would need.
    cargo = cargo_version()
    old_cargo = cargo is not None and cargo < (1, 68)
    assert len([f for f in found if "crates.io's index with git" in f.message]) == (1 if old_cargo else 0)
    assert found[-1].check == "package caches"
    assert found[-1].level == ("ok" if missing_tools() is None else "fail")
    if os.environ.get("CI") == "true":
        assert missing_tools() is None  # the install script puts mkfs, mount, nsenter and loop devices in place
    too_small = load_settings({"ENABLE_SANDBOX_NETWORK": "true", "SKILL_DEPS_MAX_MB": "8"}, env_file=None)
    assert ("fail", "SKILL_DEPS_MAX_MB: at least 16 with ENABLE_SANDBOX_NETWORK=true") in [
        (f.level, f.message) for f in check_sandbox_network(too_small, {})
    ]  # what would stop the start


def test_doctor_fails_and_explains_a_missing_nsjail(work_dir: Path) -> None:
    env = cli_env(
        NSJAIL_BINARY=str(work_dir / "missing-nsjail"),
        SANDBOX_BASE_DIR=str(work_dir / "sb"),
        DATA_DIR=str(work_dir / "data"),
    )
    result = subprocess.run(
        [*INTERPRETER, "doctor"], env=env, capture_output=True, text=True, timeout=120, check=False, cwd=work_dir
    )
    assert result.returncode == 1
    assert "FAIL  nsjail:" in result.stdout
    assert "NSJAIL_BINARY" in result.stdout


def test_doctor_reports_configured_stores_unreachable(work_dir: Path) -> None:
    port = free_port()  # nothing listens there
    settings = load_settings(
        {
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "S3_ENDPOINT": f"127.0.0.1:{port}",
            "SANDBOX_BASE_DIR": str(work_dir),
        },
        env_file=None,
    )
    findings = {f.check: f for f in collect(settings, languages_dir=work_dir, sandbox_venv=work_dir)}
    assert findings["redis"].level == "fail"
    assert findings["s3"].level == "fail"


@pytest.mark.slow
def test_server_logs_to_a_file_without_keys_or_query_strings(work_dir: Path) -> None:
    server = ServerProcess(work_dir, ENABLE_ACCESS_LOGS="true")
    server.start()
    try:
        httpx.get(f"{server.url}/health/detailed?api_key={TEST_KEY}", headers={"x-api-key": TEST_KEY + "-wrong"})
        httpx.get(f"{server.url}/health/detailed", headers=server.headers)
        httpx.get(f"{server.url}/nowhere?secret=hunter2", headers=server.headers)
    finally:
        assert server.stop() == 0
    text = server.log_path.read_text()
    lines = server.log_lines()
    assert TEST_KEY not in text
    assert "hunter2" not in text
    security = [line for line in lines if line["logger"] == "interpreter.security"]
    assert security
    assert security[0]["msg"] == "authentication failed"
    assert security[0]["path"] == "/health/detailed"
    access = [line for line in lines if line["logger"] == "interpreter.access"]
    assert any('"GET /health/detailed' in line["msg"] for line in access)
    request_lines = [line for line in lines if line["logger"] == "interpreter.http"]
    assert {(line["path"], line["status"], line["level"]) for line in request_lines} >= {
        ("/health/detailed", 401, "warning"),
        ("/nowhere", 404, "warning"),
    }
    started = next(line for line in lines if line["msg"] == "starting")
    assert started["settings"]["API_KEY"] == "***"
    assert started["kv"] == "sqlite"
    assert started["blobs"] == "dir"


def test_keys_cli_manages_keys_beside_a_running_server(work_dir: Path) -> None:
    server = ServerProcess(work_dir)
    env = cli_env(DATA_DIR=str(work_dir / "data"), SANDBOX_BASE_DIR=str(work_dir / "cli-sandboxes"))

    def keys(*args: str) -> object:
        result = subprocess.run([*INTERPRETER, "keys", *args], capture_output=True, text=True, timeout=60, env=env,
                                check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    server.start()
    try:
        created = keys("create", "ops", "--per-minute", "2")
        assert isinstance(created, dict)
        key, key_hash = created["api_key"], created["record"]["key_hash"]
        assert created["record"]["rate_limits"]["per_minute"] == 2
        statuses = [httpx.get(f"{server.url}/files/x", headers={"x-api-key": key}, timeout=10).status_code
                    for _ in range(3)]  # fmt: skip
        assert statuses == [200, 200, 429]  # the running server honours a key the CLI created
        listed = keys("list")
        assert isinstance(listed, list)
        assert [(k["name"], k["usage_count"]) for k in listed] == [("ops", 2)]
        assert key not in json.dumps(listed)
        assert keys("set-limits", key_hash)["rate_limits"]["per_minute"] is None  # type: ignore[index]
        keys("revoke", key_hash)
        assert keys("list") == []
        missing = subprocess.run([*INTERPRETER, "keys", "revoke", key_hash], capture_output=True, text=True,
                                 timeout=60, env=env, check=False)  # fmt: skip
        assert missing.returncode == 1
        bad = subprocess.run([*INTERPRETER, "keys", "create", "x", "--hourly", "0"], capture_output=True, text=True,
                             timeout=60, env=env, check=False)  # fmt: skip
        assert bad.returncode == 2
    finally:
        server.stop()
