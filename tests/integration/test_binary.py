"""The one-file binary: built from interpreter.spec, it runs the server with the nsjail it carries."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from interpreter import __version__
from tests.conftest import REPO, cli_env, free_port, open_dir

pytestmark = pytest.mark.slow

BUILD_TIMEOUT_S = 600
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def build_dir() -> Iterator[Path]:
    path = open_dir("interp-binary-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def binary(build_dir: Path) -> Path:
    log = build_dir / "pyinstaller.log"
    with log.open("wb") as out:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "PyInstaller",
                "interpreter.spec",
                "--noconfirm",
                "--distpath",
                str(build_dir / "dist"),
                "--workpath",
                str(build_dir / "build"),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    assert result.returncode == 0, log.read_text(errors="replace")[-4000:]
    path = build_dir / "dist" / "interpreter"
    assert os.access(path, os.X_OK)
    return path


def test_binary_prints_the_version(binary: Path) -> None:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"interpreter {__version__}"


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> dict[str, object]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the binary exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            reply = httpx.get(url, timeout=1)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        assert reply.status_code == 200, reply.text
        body: dict[str, object] = reply.json()
        return body
    pytest.fail(f"no /health within {READY_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-4000:]}")


def test_binary_serves_with_its_bundled_nsjail_and_stops_on_sigterm(binary: Path) -> None:
    base = open_dir("interp-binary-run-")
    for name in ("sandboxes", "data", "tmp"):
        (base / name).mkdir(mode=0o755)
    key = secrets.token_urlsafe(18)  # 24 characters
    port = free_port()
    env = cli_env(
        PORT=str(port),
        API_HOST="127.0.0.1",
        API_KEY=key,
        SANDBOX_BASE_DIR=str(base / "sandboxes"),
        DATA_DIR=str(base / "data"),
        SANDBOX_POOL_ENABLED="false",
        SANDBOX_POOL_WARMUP_ON_STARTUP="false",
        # where the bootloader unpacks itself, so that the test can look inside and check the cleanup
        TMPDIR=str(base / "tmp"),
    )
    assert "SSL_CERT_FILE" not in env  # the host's OpenSSL variable would name our certificate
    log = base / "serve.log"
    url = f"http://127.0.0.1:{port}"
    try:
        with log.open("wb") as out:
            # cwd: a directory without a .env
            proc = subprocess.Popen([str(binary), "serve"], cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            health = _wait_healthy(proc, f"{url}/health", log)
            startup_s = time.monotonic() - started
            assert health["status"] == "healthy"
            assert health["version"] == __version__

            detailed = httpx.get(f"{url}/health/detailed", headers={"x-api-key": key}, timeout=10)
            assert detailed.status_code == 200, detailed.text
            nsjail = detailed.json()["services"]["nsjail"]
            assert nsjail["status"] == "healthy", nsjail
            assert nsjail["details"]["bundled"] is True

            # The nsjail inside the bundle runs from the extraction directory: its RPATH finds the libraries.
            extracted = list((base / "tmp").glob("_MEI*"))
            assert len(extracted) == 1, extracted
            jail = extracted[0] / "nsjail" / "bin" / "nsjail"
            probe = subprocess.run([str(jail), "--help"], capture_output=True, text=True, timeout=30, check=False)
            assert "Usage:" in probe.stdout + probe.stderr, probe.stderr

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text(errors="replace")[-4000:]
            assert list((base / "tmp").iterdir()) == []  # the bootloader removed its extraction directory
            print(f"binary: {binary.stat().st_size / 2**20:.1f} MiB, start to /health {startup_s:.2f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        shutil.rmtree(base, ignore_errors=True)
