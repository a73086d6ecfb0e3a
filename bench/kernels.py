"""Benchmark of Python kernels, end to end over HTTP on loopback (the issue's targets, reported, not asserted):

- ``print(1)`` in a session whose kernel is live;
- the first run of a new session, served from the pool (a ready kernel is waited for before each sample);
- a session resumed from its checkpoint with 1 MB of state (MAX_LIVE_KERNELS=0: no kernel stays live);
- new-session throughput at concurrency 10 (the reference server: ~1.2 runs/s on this machine);
- memory of an idle live kernel (its cgroup's usage).

Writes bench/report.json (section "kernels"), keeping the others.
Run: .venv/bin/python bench/kernels.py [--runs 30] [--throughput-runs 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from common import figures, new_session_throughput, scratch, serving, write_section

REFERENCE_RUNS_PER_S = 1.2
POOL_SIZE = 4
TARGETS = {"live_print_p50_ms": 3.0, "pool_first_run_p50_ms": 15.0, "restore_1mb_p50_ms": 60.0,
           "new_session_runs_per_s_c10": 5 * REFERENCE_RUNS_PER_S}  # fmt: skip


def kernel_stats(http: httpx.Client) -> dict[str, Any]:
    stats: dict[str, Any] = http.get("/health/detailed").json()["services"]["kernels"]["details"]
    return stats


def wait_ready(http: httpx.Client, count: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while kernel_stats(http)["ready"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not refill")
        time.sleep(0.02)


def timed(http: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    reply = http.post("/exec", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    reply.raise_for_status()
    return elapsed, reply.json()


def kernel_memory_mib(run_ids: list[str]) -> list[float]:
    found = []
    for run_id in run_ids:
        for cgroup in Path("/sys/fs/cgroup/memory").glob(f"interpreter-*/run-{run_id}"):
            found.append(int((cgroup / "memory.usage_in_bytes").read_text()) / 2**20)
    return found


def live_and_pool(url: str, key: str, runs: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=120) as http:
        sid = timed(http, {"lang": "py", "code": "x = 1"})[1]["session_id"]
        wait_ready(http, POOL_SIZE)  # nothing else is starting while it is measured
        for _ in range(3):
            timed(http, {"lang": "py", "code": "print(1)", "session_id": sid})
        live = [timed(http, {"lang": "py", "code": "print(1)", "session_id": sid})[0] for _ in range(runs)]
        pool = []
        for _ in range(runs):
            wait_ready(http)
            elapsed, reply = timed(http, {"lang": "py", "code": "print(1)"})
            assert reply["runtime_status"] == "new"
            pool.append(elapsed)
        idle = kernel_memory_mib([rid for rid in kernel_stats(http)["run_ids"]])
        return {"live_print": figures(live), "pool_first_run": figures(pool),
                "idle_kernel_memory_mib_median": round(statistics.median(idle), 1) if idle else None}  # fmt: skip


def restore(url: str, key: str, runs: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=120) as http:
        wait_ready(http, 2)
        sid = timed(http, {"lang": "py", "code": "import os\nstate = os.urandom(1_000_000)"})[1]["session_id"]
        samples = []
        for _ in range(runs):
            wait_ready(http)
            elapsed, reply = timed(http, {"lang": "py", "code": "len(state)", "session_id": sid})
            assert (reply["runtime_status"], reply["stdout"]) == ("restored", "1000000\n"), reply
            samples.append(elapsed)
        return {"restore_1mb": figures(samples)}


async def throughput(url: str, key: str, total: int, concurrency: int) -> dict[str, Any]:
    rate, errors, _ = await new_session_throughput(url, key, total, concurrency)
    return {"new_session_runs_per_s_c10": round(rate, 2), "throughput_errors": errors}


def with_server(work: Path, extra: dict[str, str], measure: Any) -> dict[str, Any]:
    with serving(work, extra) as (url, key):
        result: dict[str, Any] = measure(url, key)
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--throughput-runs", type=int, default=100)
    args = parser.parse_args()
    pool = {"SANDBOX_POOL_PY": str(POOL_SIZE), "SANDBOX_POOL_REPLENISH_INTERVAL": "0"}
    with scratch("bench-kernels-") as work:
        section: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d")}
        section |= with_server(work, pool, lambda url, key: live_and_pool(url, key, args.runs))
        section |= with_server(work, {**pool, "MAX_LIVE_KERNELS": "0"}, lambda url, key: restore(url, key, args.runs))
        section |= with_server(work, pool, lambda url, key: trio.run(throughput, url, key, args.throughput_runs, 10))
    measured = {"live_print_p50_ms": section["live_print"]["p50_ms"],
                "pool_first_run_p50_ms": section["pool_first_run"]["p50_ms"],
                "restore_1mb_p50_ms": section["restore_1mb"]["p50_ms"],
                "new_session_runs_per_s_c10": section["new_session_runs_per_s_c10"]}  # fmt: skip
    section["targets"] = {
        name: {"target": TARGETS[name], "measured": value,
               "met": value >= TARGETS[name] if name.endswith("_per_s_c10") else value <= TARGETS[name]}
        for name, value in measured.items()
    }  # fmt: skip
    print(json.dumps(section, indent=2))
    write_section("kernels", section)


if __name__ == "__main__":
    main()
