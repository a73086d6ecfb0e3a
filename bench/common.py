"""What the benchmarks share: a server process on a loopback port, and percentiles."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 60
REPORT = Path(__file__).resolve().parent / "report.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server(port: int, key: str, work: Path, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``interpreter serve`` on 127.0.0.1:port, its log in work/server.log; returns once /health answers.

    SSL_CERT_FILE is dropped from the environment: this host exports it for OpenSSL, and it is also the
    guide's certificate variable.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_KEY_FILE")}
    env.update(PORT=str(port), API_HOST="127.0.0.1", API_KEY=key, SANDBOX_BASE_DIR=str(work / "sb"),
               DATA_DIR=str(work / "data"), LOG_LEVEL="WARNING", **(extra or {}))  # fmt: skip
    started = time.perf_counter()
    with open(work / "server.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "interpreter", "serve"], env=env, cwd=work, stdout=log,
                                stderr=log)  # fmt: skip
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.perf_counter() - started > START_TIMEOUT_S:
                raise RuntimeError(f"server did not start; see {work / 'server.log'}") from None
            time.sleep(0.01)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_section(name: str, section: dict[str, Any]) -> None:
    """Put ``section`` into bench/report.json under ``name``, keeping the other benchmarks' sections."""
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[name] = section
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
