"""What the benchmarks share: a server process on a loopback port, and percentiles."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

START_TIMEOUT_S = 60
REPORT = Path(__file__).resolve().parent / "report.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server(port: int, key: str, work: Path, extra: dict[str, str] | None = None,
                 command: list[str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """``interpreter serve`` (or ``command``) on 127.0.0.1:port, its log in work/server.log; returns once /health
    answers.

    SSL_CERT_FILE is dropped from the environment: this host exports it for OpenSSL, and it is also the
    guide's certificate variable.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_KEY_FILE")}
    env.update(PORT=str(port), API_HOST="127.0.0.1", API_KEY=key, SANDBOX_BASE_DIR=str(work / "sb"),
               DATA_DIR=str(work / "data"), LOG_LEVEL="WARNING", **(extra or {}))  # fmt: skip
    started = time.perf_counter()
    with open(work / "server.log", "ab") as log:
        proc = subprocess.Popen(command or [sys.executable, "-m", "interpreter", "serve"], env=env, cwd=work,
                                stdout=log, stderr=log)  # fmt: skip
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


def figures(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(samples), 1), "p95_ms": round(percentile(samples, 0.95), 1)}


@contextmanager
def serving(work: Path, extra: dict[str, str] | None = None,
            command: list[str] | None = None) -> Iterator[tuple[str, str]]:  # fmt: skip
    """A server with these settings in a directory of its own under ``work``: (its URL, its key)."""
    key, port = secrets.token_hex(16), free_port()
    node = work / f"node-{port}"
    node.mkdir(mode=0o755)
    proc = start_server(port, key, node, extra, command)
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:
        stop_server(proc)


@contextmanager
def serving_client(work: Path, extra: dict[str, str] | None = None, command: list[str] | None = None,
                   timeout_s: float = 300) -> Iterator[tuple[str, str, httpx.Client]]:  # fmt: skip
    """``serving``, and a client of it that sends the key: (URL, key, client)."""
    with (serving(work, extra, command) as (url, key),
          httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=timeout_s) as http):  # fmt: skip
        yield url, key, http


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A working directory for a benchmark's servers (0755: jails bind from below it), removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def busy_jiffies() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # everything but idle and iowait


async def new_session_throughput(url: str, key: str, total: int, concurrency: int) -> tuple[float, int, int]:
    """New sessions of `print(1)` (no session_id), ``concurrency`` at a time: (per second, errors, busy jiffies
    of the whole machine meanwhile)."""
    done = errors = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal done, errors
        while done + errors < total:
            reply = await http.post("/exec", json={"lang": "py", "code": "print(1)"})
            if reply.status_code == 200 and reply.json().get("stdout") == "1\n":
                done += 1
            else:
                errors += 1
                if errors <= 3:
                    print("error:", reply.status_code, reply.text[:300], file=sys.stderr)

    async with httpx.AsyncClient(base_url=url, headers={"x-api-key": key}, timeout=300) as http:
        before, started = busy_jiffies(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, http)
        elapsed, used = time.perf_counter() - started, busy_jiffies() - before
    return done / elapsed, errors, used
