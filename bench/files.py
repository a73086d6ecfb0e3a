"""Benchmark of sessions and files: upload and download throughput, server memory while a 100 MiB file
streams through, and what mounting and collecting files adds to a run.

Not a test: it writes bench/report.json (section "files"), keeping the other sections. Each store pair
gets its own server: the embedded one always, Redis + S3 when redis-server and moto_server are installed
(both started here on loopback ports). Run: .venv/bin/python bench/files.py [--runs 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from common import figures, free_port, scratch, start_server, stop_server, write_section

REDIS_SERVER = "/usr/bin/redis-server"
MOTO_SERVER = os.environ.get("MOTO_SERVER_BIN", "/opt/interpreter/moto-venv/bin/moto_server")
BIG_MIB = 100


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def big_body(boundary: str) -> Iterator[bytes]:
    chunk = secrets.token_bytes(1024 * 1024)
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'.encode()
    for _ in range(BIG_MIB):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def timed_exec(http: httpx.Client, body: dict[str, Any], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        reply = http.post("/exec", json=body)
        samples.append((time.perf_counter() - started) * 1000)
        reply.raise_for_status()
    return figures(samples)


def measure(url: str, key: str, pid: int, runs: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=300) as http:
        http.post("/upload", files=[("file", ("warm.txt", b"x"))]).raise_for_status()
        before = peak_rss_mib(pid)
        started = time.perf_counter()
        boundary = "benchboundary"
        reply = http.post("/upload", content=big_body(boundary),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
        upload_s = time.perf_counter() - started
        reply.raise_for_status()
        rss_growth = peak_rss_mib(pid) - before
        sid, fid = reply.json()["session_id"], reply.json()["files"][0]["fileId"]
        started = time.perf_counter()
        size = 0
        with http.stream("GET", f"/download/{sid}/{fid}") as download:
            for chunk in download.iter_raw():
                size += len(chunk)
        download_s = time.perf_counter() - started
        assert size == BIG_MIB * 1024 * 1024

        small = http.post("/upload/batch", files=[("file", (f"d/f{i}.txt", b"x" * 1000)) for i in range(20)]).json()
        refs = [{"id": f["fileId"], "storage_session_id": small["session_id"], "name": f["filename"]}
                for f in small["files"]]  # fmt: skip
        echo = {"lang": "bash", "code": "echo hi"}
        return {
            "upload_100mib_mib_s": round(BIG_MIB / upload_s, 1),
            "download_100mib_mib_s": round(BIG_MIB / download_s, 1),
            "upload_peak_rss_growth_mib": round(rss_growth, 1),
            "exec_no_files": timed_exec(http, echo, runs),
            "exec_1_file_in": timed_exec(http, {**echo, "files": refs[:1]}, runs),
            "exec_20_files_in": timed_exec(http, {**echo, "files": refs}, runs),
            "exec_1_file_out": timed_exec(http, {"lang": "bash", "code": "echo hi > out.txt"}, runs),
        }


@contextlib.contextmanager
def store_servers(work: Path) -> Iterator[dict[str, str] | None]:
    """Redis and moto_server on loopback ports, or None when either is not installed."""
    if not (os.access(REDIS_SERVER, os.X_OK) and os.access(MOTO_SERVER, os.X_OK)):
        yield None
        return
    redis_port, moto_port = free_port(), free_port()
    with open(work / "stores.log", "ab") as log:
        redis = subprocess.Popen([REDIS_SERVER, "--port", str(redis_port), "--save", "", "--appendonly", "no",
                                  "--bind", "127.0.0.1"], stdout=log, stderr=log)  # fmt: skip
        moto = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(moto_port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{moto_port}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "S3_ENDPOINT": f"127.0.0.1:{moto_port}",
               "S3_REGION": "us-east-1", "S3_BUCKET": "bench-files"}  # fmt: skip
    finally:
        for proc in (redis, moto):
            proc.terminate()
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    section: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d"), "pairs": {}}
    with scratch("bench-files-") as work, store_servers(work) as distributed:
        pairs = {"embedded (SQLite + directory)": {}, **({"Redis + S3 (moto_server)": distributed}
                                                         if distributed else {})}  # fmt: skip
        for label, extra in pairs.items():
            key = secrets.token_hex(16)
            port = free_port()
            node = work / f"node-{len(section['pairs'])}"
            node.mkdir(mode=0o755)
            proc = start_server(port, key, node, extra)
            try:
                section["pairs"][label] = measure(f"http://127.0.0.1:{port}", key, proc.pid, args.runs)
            finally:
                stop_server(proc)
            print(label, json.dumps(section["pairs"][label], indent=2))
    write_section("files", section)


if __name__ == "__main__":
    main()
