"""Live runs over a real trio-websocket client and an httpx streaming client (DESIGN §7).

Arrival is shown causally: each program prints a line, then waits on stdin; the test answers only after
it has seen that line, so the program can only finish if every line arrived while it ran.
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from tests.conftest import ServerProcess, serving

pytestmark = [
    pytest.mark.nsjail,
    # trio-websocket 0.12 leaves the client's socket to the garbage collector when the server closes
    # first; collected at the end of each test (below), inside this filter.
    pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_client_sockets() -> Iterator[None]:
    yield
    gc.collect()


LINES = 3
INTERACTIVE = {
    "py": "for i in range(3):\n    print(f'line {i}', flush=True)\n    answer = input()\n    print(f'got {answer}')",
    "bash": "for i in 0 1 2; do echo \"line $i\"; read answer; echo \"got $answer\"; done",
    "js": ("const rl = require('readline').createInterface({input: process.stdin});\nlet i = 0;\n"
           "console.log(`line ${i}`);\nrl.on('line', (a) => { console.log(`got ${a}`); i += 1;\n"
           "  if (i < 3) console.log(`line ${i}`); else rl.close(); });"),
    "c": ("#include <stdio.h>\nint main(void) { char a[64];\n  for (int i = 0; i < 3; i++) {\n"
          "    printf(\"line %d\\n\", i); fflush(stdout);\n    if (!fgets(a, sizeof a, stdin)) return 1;\n"
          "    printf(\"got %s\", a); }\n  return 0; }"),
}  # fmt: skip


@pytest.fixture(scope="module")
def streaming() -> Iterator[ServerProcess]:
    with serving("interp-stream-", MAX_EXECUTION_TIME="30") as instance:
        yield instance


def ws_url(server: ServerProcess, key: str | None = None) -> str:
    return f"ws://127.0.0.1:{server.port}/ws/exec" + (f"?api_key={key}" if key else "")


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(60):
        message: dict[str, Any] = json.loads(await ws.get_message())
    return message


async def output_until(ws: WebSocketConnection, text: str) -> str:
    """Stdout events joined until ``text`` is in them (a line may come in more than one event)."""
    seen = ""
    while text not in seen:
        event = await receive(ws)
        assert event["type"] == "stdout", event
        seen += event["data"]
    return seen


async def read_until_closed(ws: WebSocketConnection) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            events.append(await receive(ws))
    return events


async def converse(server: ServerProcess, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Run ``body``; answer each ``line N`` with ``answer N`` only once it arrived. Returns (events, all stdout)."""
    events: list[dict[str, Any]] = []
    seen = ""
    answered = 0
    async with open_websocket_url(ws_url(server), extra_headers=[("x-api-key", server.key)]) as ws:
        await ws.send_message(json.dumps(body))
        while True:
            event = await receive(ws)
            events.append(event)
            if event["type"] == "stdout":
                seen += event["data"]
                while f"line {answered}\n" in seen and answered < LINES:
                    await ws.send_message(json.dumps({"type": "stdin", "data": f"answer {answered}\n"}))
                    answered += 1
                    if answered == LINES:
                        await ws.send_message(json.dumps({"type": "stdin_eof"}))
            if event["type"] in ("result", "error"):
                break
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1000
    return events, seen


@pytest.mark.parametrize("lang", sorted(INTERACTIVE))
async def test_lines_arrive_while_the_program_runs_and_stdin_answers_them(streaming: ServerProcess, lang: str) -> None:
    events, seen = await converse(streaming, {"lang": lang, "code": INTERACTIVE[lang]})
    expected = "".join(f"line {i}\ngot answer {i}\n" for i in range(LINES))
    assert seen == expected
    assert events[0]["type"] == "started"
    result = events[-1]
    assert result["type"] == "result"
    assert (result["status"], result["stdout"]) == ("ok", expected)
    assert result["session_id"] == events[0]["session_id"]


async def test_python_without_the_repl_streams_too(work_dir: Path) -> None:
    server = ServerProcess(work_dir, REPL_ENABLED="false")
    server.start()
    try:
        _, seen = await converse(server, {"lang": "py", "code": INTERACTIVE["py"]})
        assert seen == "".join(f"line {i}\ngot answer {i}\n" for i in range(LINES))
    finally:
        server.stop()


async def test_the_result_is_the_one_exec_returns(streaming: ServerProcess) -> None:
    code = "echo out; echo err >&2; echo data > f.txt; exit 3"
    events, _ = await converse(streaming, {"lang": "bash", "code": code})
    streamed = events[-1]
    plain = streaming.exec(code, "bash")
    varying = {"type", "session_id", "runtime_session_id", "duration_ms", "files"}
    assert {k: v for k, v in streamed.items() if k not in varying} == {
        k: v for k, v in plain.items() if k not in varying
    }
    assert [f["name"] for f in streamed["files"]] == [f["name"] for f in plain["files"]] == ["f.txt"]
    assert set(streamed) - {"type"} == set(plain)


async def test_stdin_eof_ends_the_programs_input(streaming: ServerProcess) -> None:
    async with open_websocket_url(ws_url(streaming, streaming.key)) as ws:
        await ws.send_message(json.dumps({"lang": "bash", "code": "echo ready; wc -l"}))
        assert (await receive(ws))["type"] == "started"
        assert await output_until(ws, "ready\n") == "ready\n"
        for line in ("a\n", "b\n"):
            await ws.send_message(json.dumps({"type": "stdin", "data": line}))
        await ws.send_message(json.dumps({"type": "stdin_eof"}))
        events = [await receive(ws)]
        while events[-1]["type"] != "result":
            events.append(await receive(ws))
        assert events[-1]["stdout"] == "ready\n2\n"


@pytest.mark.parametrize("lang", ["bash", "py"])
async def test_cancel_and_disconnect_stop_the_run_and_free_its_jail(streaming: ServerProcess, lang: str) -> None:
    code = {"bash": "echo started; sleep 60", "py": "import time\nprint('started', flush=True)\ntime.sleep(60)"}[lang]
    for ending in ("cancel", "disconnect"):
        async with open_websocket_url(ws_url(streaming, streaming.key)) as ws:
            await ws.send_message(json.dumps({"lang": lang, "code": code}))
            assert (await receive(ws))["type"] == "started"
            assert await output_until(ws, "started\n") == "started\n"
            if ending == "cancel":
                await ws.send_message(json.dumps({"type": "cancel"}))
                event = await receive(ws)
                assert (event["type"], event["error_type"]) == ("error", "cancelled")
        # Nothing of the run is left: no run directory, cgroup or process (a kernel's jail included).
        assert await trio.to_thread.run_sync(streaming.wait_clean) == {"run_dirs": [], "cgroups": [], "processes": []}
    assert streaming.healthy()


async def test_a_refused_key_is_refused_at_the_handshake(streaming: ServerProcess) -> None:
    for url, headers in ((ws_url(streaming), []), (ws_url(streaming, "wrong-key"), []),
                         (ws_url(streaming), [("x-api-key", "wrong-key")])):  # fmt: skip
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(url, extra_headers=headers):
                pass
        assert rejected.value.status_code == 401
    # Browsers: the key as a subprotocol, next to the one the server accepts.
    async with open_websocket_url(ws_url(streaming), subprotocols=["interpreter", f"key.{streaming.key}"]) as ws:
        assert ws.subprotocol == "interpreter"
        await ws.send_message(json.dumps({"lang": "bash", "code": "echo hi"}))
        assert (await receive(ws))["type"] == "started"


@pytest.mark.parametrize(
    ("messages", "code", "error"),
    [
        ([b"\x00binary"], 1003, "Binary"),
        (["not json"], 1008, "not JSON"),
        (['{"type": "stdin", "data": "x"}'], 1008, "first message"),
        (['{"lang": "py"}'], 1008, "validation"),
        (['{"lang": "cobol", "code": "x"}'], 1008, "Unsupported"),
        (['{"lang": "bash", "code": "sleep 30"}', '{"type": "dance"}'], 1008, "Unexpected"),
        (['{"lang": "bash", "code": "sleep 30"}', '{"type": "stdin_eof"}', '{"type": "stdin", "data": "x"}'],
         1008, "Unexpected"),
    ],
    ids=["binary", "not-json", "control-first", "invalid-body", "bad-language", "unknown-type", "stdin-after-eof"],
)  # fmt: skip
async def test_malformed_messages_get_an_error_and_a_close(streaming: ServerProcess, messages: list[str | bytes],
                                                           code: int, error: str) -> None:  # fmt: skip
    async with open_websocket_url(ws_url(streaming, streaming.key)) as ws:
        for message in messages:
            await ws.send_message(message)
        events = await read_until_closed(ws)
        assert ws.closed is not None
        assert ws.closed.code == code
        errors = [event for event in events if event["type"] == "error"]
        assert len(errors) == 1
        assert error.lower() in json.dumps(errors[0]).lower()
    assert await trio.to_thread.run_sync(streaming.wait_clean) == {"run_dirs": [], "cgroups": [], "processes": []}


async def test_fifty_concurrent_streams_all_complete(streaming: ServerProcess) -> None:
    results: list[dict[str, Any]] = []

    async def one(n: int) -> None:
        async with open_websocket_url(ws_url(streaming, streaming.key)) as ws:
            await ws.send_message(json.dumps({"lang": "bash", "code": f"echo {n}"}))
            while (event := await receive(ws))["type"] != "result":
                pass
            results.append(event)

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(one, n)
    assert sorted(int(r["stdout"]) for r in results) == list(range(50))
    assert {r["status"] for r in results} == {"ok"}


async def test_a_client_that_does_not_read_gets_a_truncated_run(streaming: ServerProcess) -> None:
    # The result repeats the whole output: a client must accept messages of twice MAX_OUTPUT_MB and more.
    async with open_websocket_url(ws_url(streaming, streaming.key), max_message_size=8 * 2**20) as ws:
        await ws.send_message(json.dumps({"lang": "bash", "code": "yes 0123456789abcdef"}))
        await trio.sleep(3)  # not reading: the output piles up only to the run's own cap
        total = 0
        while (event := await receive(ws))["type"] != "result":
            total += len(event.get("data", ""))
        assert (event["status"], event["truncated"]) == ("output_limit", True)
        assert total == len(event["stdout"]) == 1024 * 1024
    assert streaming.healthy()


def test_server_sent_events_stream_the_same_run(streaming: ServerProcess) -> None:
    events = []
    with httpx.stream("POST", f"{streaming.url}/exec/stream", headers=streaming.headers, timeout=60,
                      json={"lang": "bash", "code": "echo one; sleep 0.2; echo two"}) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    assert [name for name, _ in events] == ["started", "stdout", "stdout", "result"]
    assert [data["data"] for name, data in events if name == "stdout"] == ["one\n", "two\n"]
    assert events[-1][1]["stdout"] == "one\ntwo\n"
    refused = httpx.post(f"{streaming.url}/exec/stream", json={"lang": "bash", "code": "echo"}, timeout=30)
    assert refused.status_code == 401


def test_a_server_shutdown_stops_the_run_and_closes_with_1001(work_dir: Path) -> None:
    server = ServerProcess(work_dir)
    server.start()
    closed: list[int] = []

    async def client() -> None:
        async with open_websocket_url(ws_url(server, server.key)) as ws:
            await ws.send_message(json.dumps({"lang": "bash", "code": "echo up; sleep 60"}))
            assert (await receive(ws))["type"] == "started"
            assert await output_until(ws, "up\n") == "up\n"
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            await read_until_closed(ws)
            assert ws.closed is not None
            closed.append(ws.closed.code)

    try:
        trio.run(client)
    finally:
        assert server.proc is not None
        assert server.proc.wait(timeout=30) == 0
    assert closed == [1001]
