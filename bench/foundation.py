"""Benchmark of the bare server: start-up time, /health latency, and throughput at concurrency 10.

Not a test: it writes figures to bench/report.json (section "foundation") for the README.
Run: .venv/bin/python bench/foundation.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import trio
from common import free_port, percentile, start_server, write_section


def start_timed(port: int, key: str, work: Path) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    proc = start_server(port, key, work)
    return proc, time.perf_counter() - started


async def sequential(url: str, n: int, headers: dict[str, str]) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            response = await http.get(url, headers=headers)
            latencies.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
    return latencies


async def concurrent(url: str, n: int, concurrency: int) -> tuple[float, int]:
    errors = 0
    remaining = n

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            if (await http.get(url)).status_code != 200:
                errors += 1

    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, http)
        return n / (time.perf_counter() - t0), errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    work.chmod(0o755)
    key, port = secrets.token_urlsafe(24), free_port()
    starts = []
    for _ in range(3):
        proc, seconds = start_timed(port, key, work)
        starts.append(seconds * 1000)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    proc, _ = start_timed(port, key, work)
    try:
        base = f"http://127.0.0.1:{port}"
        health = trio.run(sequential, f"{base}/health", args.requests, {})
        detailed = trio.run(sequential, f"{base}/health/detailed", 100, {"x-api-key": key})
        rps, errors = trio.run(concurrent, f"{base}/health", args.requests, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    section = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "startup_to_health_ms_median": round(statistics.median(starts), 1),
        "health_latency_ms": {"p50": round(percentile(health, 0.5), 2), "p95": round(percentile(health, 0.95), 2)},
        "health_detailed_latency_ms": {
            "p50": round(percentile(detailed, 0.5), 2),
            "p95": round(percentile(detailed, 0.95), 2),
        },
        "health_throughput_rps_c10": round(rps, 1),
        "errors": errors,
        "requests": args.requests,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_section("foundation", section)
    print(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
