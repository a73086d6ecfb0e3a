"""Benchmark of live output: how long a flushed line takes from the program to a WebSocket client.

The program prints the wall-clock time (this host's clock, shared with the client) and flushes, then
waits on stdin; the client answers once it has the line, so the samples never overlap. Reported for a
Python kernel and for bash (one-shot). Target from the issue: a flushed line within 50 ms.
Writes bench/report.json (section "streaming"). Run: .venv/bin/python bench/streaming.py [--lines 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import trio
from common import percentile, scratch, serving, write_section
from trio_websocket import open_websocket_url

TARGET_MS = 50.0
PROGRAMS = {
    "py": "import time\nfor _ in range({n}):\n    print(repr(time.time()), flush=True)\n    input()",
    "bash": "for i in $(seq {n}); do date +%s.%N; read x; done",
}


async def arrival_ms(url: str, key: str, lang: str, lines: int) -> list[float]:
    delays: list[float] = []
    pending = ""  # a line's start, until its newline arrives (a print may reach the client in two chunks)
    async with open_websocket_url(f"{url}/ws/exec?api_key={key}") as ws:
        await ws.send_message(json.dumps({"lang": lang, "code": PROGRAMS[lang].format(n=lines)}))
        while True:
            event: dict[str, Any] = json.loads(await ws.get_message())
            now = time.time()
            if event["type"] == "stdout":
                *complete, pending = (pending + event["data"]).split("\n")
                for line in complete:
                    delays.append((now - float(line)) * 1000)
                    await ws.send_message(json.dumps({"type": "stdin", "data": "\n"}))
            elif event["type"] in ("result", "error"):
                return delays


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50)
    args = parser.parse_args()
    section: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d"), "target_ms": TARGET_MS}
    with scratch("bench-stream-") as work, serving(work) as (url, key):
        ws_url = url.replace("http://", "ws://")
        for lang in PROGRAMS:
            trio.run(arrival_ms, ws_url, key, lang, 3)  # warm-up (a pool kernel for py)
            delays = trio.run(arrival_ms, ws_url, key, lang, args.lines)
            section[lang] = {
                "p50_ms": round(statistics.median(delays), 2),
                "p95_ms": round(percentile(delays, 0.95), 2),
                "max_ms": round(max(delays), 2),
                "lines": len(delays),
            }
    print(json.dumps(section, indent=2))
    write_section("streaming", section)


if __name__ == "__main__":
    main()
