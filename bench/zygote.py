"""Benchmark of new Python sessions, zygote kernels against a fresh nsjail per kernel, in one run.

For each KERNEL_MODE, over HTTP on loopback with the default pool settings:
- new-session ``print(1)`` latency, p50 / p95, sequential (each request a new session);
- new-session throughput at concurrency 1, 4 and 10 (zygote: the median of three runs each);
- CPU per new session: the machine's busy time (/proc/stat) during the concurrency-10 run, per session;
- unique memory per idle kernel: private pages (smaps_rollup) of every process in the kernel's cgroup.

Targets (issue): p50 <= 15 ms, >= 60 new sessions/s at concurrency 10, <= 5 MB unique per idle kernel.
Writes bench/report.json (section "zygote"). Run: .venv/bin/python bench/zygote.py [--runs 60] [--sessions 300]
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
from common import new_session_throughput, percentile, scratch, serving_client, write_section

TARGETS = {"new_session_p50_ms": 15.0, "new_sessions_per_s_c10": 60.0, "idle_kernel_unique_mib": 5.0}
IDLE_KERNELS = 8


def unique_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Private_"))
    return total / 1024


def kernel_pids(run_id: str) -> list[int]:
    for procs in Path("/sys/fs/cgroup/memory").glob(f"interpreter-*/run-{run_id}/cgroup.procs"):
        return [int(pid) for pid in procs.read_text().split()]
    return []


def sequential(http: httpx.Client, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        reply = http.post("/exec", json={"lang": "py", "code": "print(1)"})
        samples.append((time.perf_counter() - started) * 1000)
        assert reply.json()["stdout"] == "1\n", reply.text
    return samples


def measure(mode: str, work: Path, runs: int, sessions: int, repeats: int) -> dict[str, Any]:
    with serving_client(work, {"KERNEL_MODE": mode}) as (url, key, http):
        sequential(http, 3)  # warm up (the zygote's first start, caches)
        latency = sequential(http, runs)
        section: dict[str, Any] = {"new_session_p50_ms": round(statistics.median(latency), 1),
                                   "new_session_p95_ms": round(percentile(latency, 0.95), 1)}  # fmt: skip
        for concurrency in (1, 4, 10):
            count = sessions if concurrency > 1 else max(20, sessions // 5)
            # The machine is shared: each figure is the median of `repeats` runs, all of them kept.
            trials = [trio.run(new_session_throughput, url, key, count, concurrency) for _ in range(repeats)]
            rates = sorted(round(rate, 1) for rate, _, _ in trials)
            section[f"new_sessions_per_s_c{concurrency}"] = statistics.median(rates)
            section[f"new_sessions_per_s_c{concurrency}_runs"] = rates
            section[f"errors_c{concurrency}"] = sum(errors for _, errors, _ in trials)
            if concurrency == 10:
                ticks = statistics.median(used for _, _, used in trials)  # 100 Hz
                section["cpu_ms_per_new_session"] = round(ticks * 1000 / 100 / max(1, count), 1)
        http.post("/exec", json={"lang": "py", "code": "1"})
        time.sleep(2)  # idle: nothing running, pools refilled
        details = http.get("/health/detailed").json()["services"]["kernels"]["details"]
        unique = [unique_mib(kernel_pids(run_id)) for run_id in details["run_ids"][:IDLE_KERNELS]]
        section["idle_kernel_unique_mib"] = round(statistics.median(unique), 1) if unique else None
        return section


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--sessions", type=int, default=300)
    args = parser.parse_args()
    section: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d")}
    with scratch("bench-zygote-") as work:
        for mode in ("zygote", "nsjail"):
            zygote = mode == "zygote"  # the baseline is 20 times slower: fewer sessions, one run each
            section[mode] = measure(
                mode, work, args.runs, args.sessions if zygote else args.sessions // 5, repeats=3 if zygote else 1
            )
    zygote, nsjail = section["zygote"], section["nsjail"]
    section["speedup_c10"] = round(zygote["new_sessions_per_s_c10"] / nsjail["new_sessions_per_s_c10"], 1)
    section["targets"] = {
        name: {"target": target, "measured": zygote[name],
               "met": zygote[name] >= target if "per_s" in name else zygote[name] <= target}
        for name, target in TARGETS.items()
    }  # fmt: skip
    print(json.dumps(section, indent=2))
    write_section("zygote", section)


if __name__ == "__main__":
    main()
