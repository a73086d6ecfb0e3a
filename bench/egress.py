"""Benchmark of the sandbox network (ENABLE_SANDBOX_NETWORK), in one run.

- The proxy alone (in this process, loopback, a thread as the client): CONNECT to "200" latency through
  the proxy against a direct TCP connect, and download throughput through a tunnel against direct.
- A server with the network on against one with it off (zygote kernels, over HTTP): new-session
  ``print(1)`` and one-shot ``bash`` latency, and the time of a first ``pip install`` of a small wheel
  from a loopback HTTPS index (the test suite's index and resolver: nothing leaves the machine).

Writes bench/report.json (section "egress"). Run: .venv/bin/python bench/egress.py [--runs 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from common import figures, scratch, serving_client, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpreter.egress.allowlist import Allowlist
from interpreter.egress.proxy import EgressProxy
from tests.egress.index import FILES_HOST, INDEX_HOST, PackageIndex, make_wheel, package_index
from tests.egress.resolver import MappedResolver
from tests.egress.serving import REPO, SERVE_MAPPED

DOWNLOAD_BYTES = 256 * 2**20
CHUNK = 1 << 20


async def _send_bytes(stream: trio.SocketStream) -> None:
    """The 'registry': on connect, sends DOWNLOAD_BYTES and closes (latency probes hang up at once)."""
    async with stream:
        block = b"\0" * CHUNK
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(DOWNLOAD_BYTES // CHUNK):
                await stream.send_all(block)


def _client(port: int, runs: int, through_proxy: bool) -> tuple[list[float], float]:
    """(connect latencies in ms, MiB/s of one download); blocking, in a worker thread."""
    latencies = []
    for index in range(runs + 1):
        started = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", port))
        if through_proxy:
            sock.sendall(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)  # (byte by byte: nothing of the payload is read here)
            assert head.startswith(b"HTTP/1.1 200"), head
        latencies.append((time.perf_counter() - started) * 1000)
        if index < runs:
            sock.close()
            continue
        received, started = 0, time.perf_counter()
        while data := sock.recv(CHUNK):
            received += len(data)
        elapsed = time.perf_counter() - started
        sock.close()
        assert received == DOWNLOAD_BYTES
    return latencies[:runs], DOWNLOAD_BYTES / 2**20 / elapsed


async def proxy_alone(runs: int) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        registry = (await nursery.start(partial(trio.serve_tcp, _send_bytes, 0, host="127.0.0.1")))[0]
        registry_port = registry.socket.getsockname()[1]
        proxy = EgressProxy(Allowlist.of(["pypi.org"]), MappedResolver({"pypi.org": ("127.0.0.1", registry_port)}))
        await nursery.start(proxy.run)
        listener = socket.create_server(("127.0.0.1", 0))
        proxy.attach(listener, "bench", "bench")
        port = listener.getsockname()[1]
        direct_ms, direct_rate = await trio.to_thread.run_sync(_client, registry_port, runs, False)
        proxied_ms, proxied_rate = await trio.to_thread.run_sync(_client, port, runs, True)
        nursery.cancel_scope.cancel()
    return {
        "connect_direct": figures(direct_ms), "connect_through_proxy": figures(proxied_ms),
        "download_mib_per_s_direct": round(direct_rate), "download_mib_per_s_through_proxy": round(proxied_rate),
        "throughput_ratio": round(proxied_rate / direct_rate, 2),
    }  # fmt: skip


def latencies(http: httpx.Client, code: str, lang: str, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        reply = http.post("/exec", json={"lang": lang, "code": code})
        samples.append((time.perf_counter() - started) * 1000)
        assert reply.json()["status"] == "ok", reply.text
    return samples


def server_figures(work: Path, runs: int, network: bool, index: PackageIndex) -> dict[str, Any]:
    extra = {"KERNEL_MODE": "zygote"}
    command = None
    if network:
        deps = work / "deps"
        deps.mkdir(mode=0o755, exist_ok=True)
        mapping = {"exempt": {INDEX_HOST: ["127.0.0.1", index.port], FILES_HOST: ["127.0.0.1", index.port]}}
        extra |= {"ENABLE_SANDBOX_NETWORK": "true", "SKILL_DEPS_PATH": str(deps), "PYTHONPATH": str(REPO),
                  "TEST_EGRESS_RESOLVER": json.dumps(mapping)}  # fmt: skip
        command = SERVE_MAPPED
    with serving_client(work, extra, command) as (_, _, http):
        latencies(http, "print(1)", "py", 3)  # warm up
        section: dict[str, Any] = {
            "new_session_py": figures(latencies(http, "print(1)", "py", runs)),
            "one_shot_bash": figures(latencies(http, "true", "bash", runs)),
        }
        if network:
            code = index.trusting("pip install -q --cert /tmp/ca.pem benchpkg && python3 -c 'import benchpkg'")
            for attempt in ("first", "again"):  # again: installed already, pip only asks the index
                started = time.perf_counter()
                reply = http.post("/exec", json={"lang": "bash", "code": code}).json()
                assert reply["status"] == "ok", reply
                section[f"pip_install_{attempt}_s"] = round(time.perf_counter() - started, 2)
    return section


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    section: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d"), "proxy": trio.run(proxy_alone, args.runs)}
    with (scratch("bench-egress-") as work,
          package_index(work, {"benchpkg": make_wheel("benchpkg", "1.0", "VALUE = 1\n")}) as index):  # fmt: skip
        section["network_off"] = server_figures(work, args.runs, False, index)
        section["network_on"] = server_figures(work, args.runs, True, index)
    print(json.dumps(section, indent=2))
    write_section("egress", section)


if __name__ == "__main__":
    main()
