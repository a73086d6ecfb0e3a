"""Benchmark of programmatic tool calling, end to end over HTTP on loopback (reported, not asserted):

- the first reply of a run in a live session (the code runs up to its first tool call);
- a continuation answered by the paused kernel (result in, next tool call out);
- a continuation that has to be replayed (MAX_LIVE_KERNELS=0: a paused kernel is evicted at once, as on
  another node or after a restart): a ready kernel from the pool, the checkpoint the run started from,
  the code again up to its last pause with the recorded round answered, then the new round.

The reference server waits ~0.5 s for stderr at every pause. Writes bench/report.json (section
"programmatic"), keeping the others. Run: .venv/bin/python bench/programmatic.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from common import figures, scratch, serving_client, write_section

CODE = "for i in range(4):\n    await step(i=i)"
REPLAYED = "first = await step(i=0)\nsecond = await step(i=1)"


def timed_post(http: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    reply = http.post("/exec/programmatic", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    if reply.status_code != 200:
        raise RuntimeError(reply.text)
    return elapsed, reply.json()


def answer(reply: dict[str, Any]) -> dict[str, Any]:
    results = [{"call_id": call["id"], "result": call["input"]} for call in reply["tool_calls"]]
    return {"continuation_token": reply["continuation_token"], "tool_results": results}


def wait_ready(http: httpx.Client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while http.get("/health/detailed").json()["services"]["kernels"]["details"]["ready"] < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not refill")
        time.sleep(0.02)


def live(http: httpx.Client, runs: int) -> dict[str, Any]:
    session = http.post("/exec", json={"lang": "py", "code": "1"}).json()["session_id"]
    firsts, rounds = [], []
    for _ in range(runs):
        elapsed, reply = timed_post(http, {"code": CODE, "tools": [{"name": "step"}], "session_id": session})
        firsts.append(elapsed)
        while reply["status"] == "tool_call_required":
            elapsed, reply = timed_post(http, answer(reply))
            rounds.append(elapsed)
        assert reply["status"] == "completed", reply
    return {"first_reply": figures(firsts), "live_round": figures(rounds)}


def replayed(http: httpx.Client, runs: int) -> dict[str, Any]:
    session = http.post("/exec", json={"lang": "py", "code": "1"}).json()["session_id"]
    samples = []
    for _ in range(runs):
        _, first = timed_post(http, {"code": REPLAYED, "tools": [{"name": "step"}], "session_id": session})
        wait_ready(http)  # a replay takes a ready kernel, as another node's pool would have
        elapsed, reply = timed_post(http, answer(first))
        assert reply["status"] == "tool_call_required", reply
        samples.append(elapsed)
        timed_post(http, answer(reply))
    return {"replayed_round": figures(samples)}


def with_server(work: Path, extra: dict[str, str], body: Callable[[httpx.Client], dict[str, Any]]) -> dict[str, Any]:
    with serving_client(work, {"SANDBOX_POOL_PY": "2", **extra}, timeout_s=60) as (_, _, http):
        return body(http)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with scratch("bench-ptc-") as work:
        section: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d")}
        section |= with_server(work, {}, lambda http: live(http, args.runs))
        section |= with_server(work, {"MAX_LIVE_KERNELS": "0"}, lambda http: replayed(http, args.runs))
    section["replay_vs_live_round"] = round(section["replayed_round"]["p50_ms"] / section["live_round"]["p50_ms"], 1)
    print(json.dumps(section, indent=2))
    write_section("programmatic", section)


if __name__ == "__main__":
    main()
