"""Programmatic tool calling over HTTP, on both store pairs: rounds, gather, errors, budgets across rounds,
cancel, tokens (wrong, foreign, used, expired), the round limit, bash tools, files and state; then a run
continued on another node (replayed there) and after a restart.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, serving

pytestmark = pytest.mark.nsjail

OTHER_KEY = "other-key-" + secrets.token_hex(12)
KEYS = {"status", "session_id", "continuation_token", "tool_calls", "stdout", "stderr", "files", "error"}
TOKEN_TTL_S = 4
MAX_ROUNDS = 3
SETTINGS = {"PTC_TOKEN_TTL_SECONDS": str(TOKEN_TTL_S), "PTC_MAX_ROUNDS": str(MAX_ROUNDS), "MAX_EXECUTION_TIME": "20",
            "API_KEYS": OTHER_KEY}  # fmt: skip


def shared_stores(request: pytest.FixtureRequest, prefix: str) -> dict[str, str]:
    return {"REDIS_URL": request.getfixturevalue("redis_url"), "S3_ENDPOINT": request.getfixturevalue("s3_endpoint"),
            "S3_REGION": "us-east-1", "S3_BUCKET": f"{prefix}-{secrets.token_hex(6)}"}  # fmt: skip


@pytest.fixture(scope="module", params=["embedded", "redis+s3"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    stores = shared_stores(request, "ptc") if request.param == "redis+s3" else {}
    with serving("interp-ptc-", **SETTINGS, **stores) as instance:
        yield instance


def ptc(server: ServerProcess, key: str | None = None, headers: dict[str, str] | None = None,
        **body: Any) -> dict[str, Any]:  # fmt: skip
    response = httpx.post(f"{server.url}/exec/programmatic", json=body,
                          headers={"x-api-key": key or server.key, **(headers or {})}, timeout=60)  # fmt: skip
    assert response.status_code == 200, f"{response.text}\n{server.log_tail(30)}"
    reply: dict[str, Any] = response.json()
    assert set(reply) == KEYS  # every reply has the reference's eight keys, nulls included
    return reply


def answer(server: ServerProcess, reply: dict[str, Any], value: Callable[[dict[str, Any]], Any] | None = None,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    """Continue ``reply``, answering each call with ``value(call)`` (default: its input)."""
    assert reply["status"] == "tool_call_required", reply
    results = [{"call_id": call["id"], "result": (value or (lambda c: c["input"]))(call), "is_error": False}
               for call in reply["tool_calls"]]  # fmt: skip
    return ptc(server, continuation_token=reply["continuation_token"], tool_results=results, **extra)


def names(reply: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(call["name"], call["input"]) for call in reply["tool_calls"]]


# --- rounds ---------------------------------------------------------------------------------------------


def test_the_reference_example_exchange(server: ServerProcess) -> None:
    code = "first = await get_number()\nsecond = await get_word()\nprint(f'{first}-{second}')"
    first = ptc(server, code=code, tools=[{"name": "get_number"}, {"name": "get_word"}], timeout=10_000)
    assert (first["stdout"], first["files"], first["error"]) == ("", [], None)
    assert names(first) == [("get_number", {})]
    assert len(first["tool_calls"][0]["id"]) == 12
    second = answer(server, first, lambda call: 7)
    assert names(second) == [("get_word", {})]
    assert second["session_id"] == first["session_id"]
    assert second["continuation_token"] != first["continuation_token"]
    done = answer(server, second, lambda call: "complete")
    assert (done["status"], done["stdout"], done["stderr"], done["error"]) == ("completed", "7-complete\n", "", None)
    assert (done["continuation_token"], done["tool_calls"]) == (None, None)


def test_code_without_tool_calls_completes_at_once(server: ServerProcess) -> None:
    reply = ptc(server, code="print(6 * 7)", tools=[{"name": "unused"}])
    assert (reply["status"], reply["stdout"], reply["tool_calls"]) == ("completed", "42\n", None)
    v1 = httpx.post(f"{server.url}/v1/exec/programmatic", json={"code": "print(1)"}, headers=server.headers).json()
    assert (v1["status"], v1["stdout"]) == ("completed", "1\n")


def test_a_workspace_id_keeps_runs_in_one_session(server: ServerProcess) -> None:
    workspace = {"X-LibreChat-Code-Workspace-ID": secrets.token_hex(8)}
    first = ptc(server, headers=workspace, code="note = 'kept'", tools=[])
    second = ptc(server, headers=workspace, code="print(note)", tools=[])
    assert (second["session_id"], second["stdout"]) == (first["session_id"], "kept\n")


def test_calls_made_together_come_out_in_one_round(server: ServerProcess) -> None:
    code = ("import asyncio\n"
            "results = await asyncio.gather(lookup(city='NYC'), lookup(city='Paris'), weather(day=3))\n"
            "print(results)")  # fmt: skip
    first = ptc(server, code=code, tools=[{"name": "lookup"}, {"name": "weather"}])
    assert names(first) == [("lookup", {"city": "NYC"}), ("lookup", {"city": "Paris"}), ("weather", {"day": 3})]
    assert len({call["id"] for call in first["tool_calls"]}) == 3
    # Results may come in any order: they are matched by call id.
    results = [{"call_id": call["id"], "result": call["input"]} for call in reversed(first["tool_calls"])]
    done = ptc(server, continuation_token=first["continuation_token"], tool_results=results)
    assert done["stdout"] == "[{'city': 'NYC'}, {'city': 'Paris'}, {'day': 3}]\n"


def test_tool_names_are_normalised_and_calls_carry_the_original(server: ServerProcess) -> None:
    code = "print(await get_the_weather(), await class_tool(), await _3d())"
    first = ptc(server, code=code, tools=[{"name": "get-the weather"}, {"name": "class"}, {"name": "3d"}])
    assert names(first) == [("get-the weather", {})]
    second = answer(server, first, lambda call: 1)
    assert names(second) == [("class", {})]
    third = answer(server, second, lambda call: 2)
    assert names(third) == [("3d", {})]
    assert answer(server, third, lambda call: 3)["stdout"] == "1 2 3\n"


# --- errors -----------------------------------------------------------------------------------------------


def test_a_failed_tool_raises_where_the_code_can_catch_it(server: ServerProcess) -> None:
    code = ("try:\n    await search(q='x')\nexcept RuntimeError as exc:\n    print('caught:', exc)\n"
            "await search(q='y')")  # fmt: skip
    first = ptc(server, code=code, tools=[{"name": "search"}])
    failed = [{"call_id": first["tool_calls"][0]["id"], "is_error": True, "error_message": "quota exceeded"}]
    second = ptc(server, continuation_token=first["continuation_token"], tool_results=failed)
    assert names(second) == [("search", {"q": "y"})]
    # Uncaught, it ends the run with status error, the exception as error and its traceback in stderr.
    failed = [{"call_id": second["tool_calls"][0]["id"], "is_error": True}]
    done = ptc(server, continuation_token=second["continuation_token"], tool_results=failed)
    assert (done["status"], done["stdout"]) == ("error", "caught: quota exceeded\n")
    assert done["error"] == "ToolError: Tool call failed"
    assert "Traceback" in done["stderr"]
    assert "line 5" in done["stderr"]


def test_a_call_left_unanswered_fails_in_the_code(server: ServerProcess) -> None:
    first = ptc(server, code="try:\n    await t()\nexcept RuntimeError as exc:\n    print(exc)", tools=[{"name": "t"}])
    done = ptc(server, continuation_token=first["continuation_token"], tool_results=[])
    assert done["stdout"] == f"No result was given for tool call {first['tool_calls'][0]['id']}\n"


@pytest.mark.parametrize(
    ("code", "error"),
    [("raise ValueError('boom')", "ValueError: boom"), ("def f(:\n  pass", "SyntaxError: invalid syntax"),
     ("import sys; sys.exit(4)", "SystemExit: 4")],
    ids=["exception", "syntax", "exit"],
)  # fmt: skip
def test_code_that_fails_is_status_error(server: ServerProcess, code: str, error: str) -> None:
    reply = ptc(server, code=code)
    assert (reply["status"], reply["error"], reply["continuation_token"]) == ("error", error, None)


def test_missing_code_and_bad_requests(server: ServerProcess) -> None:
    assert ptc(server)["error"] == "Either 'code' or 'continuation_token' must be provided"
    assert ptc(server, code="  ")["status"] == "error"
    response = httpx.post(f"{server.url}/exec/programmatic", json={"code": "1", "lang": "js"}, headers=server.headers)
    assert response.status_code == 422
    assert "lang must be one of ['bash', 'py'], got 'js'" in response.json()["details"][0]["message"]
    colliding = {"code": "1", "tools": [{"name": "a-b"}, {"name": "a b"}]}
    response = httpx.post(f"{server.url}/exec/programmatic", json=colliding, headers=server.headers)
    assert (response.status_code, response.json()["details"][0]["code"]) == (400, "tool_name_collision")
    assert httpx.post(f"{server.url}/exec/programmatic", json={"code": "1"}).status_code == 401
    assert server.healthy()


# --- budgets ------------------------------------------------------------------------------------------------


def test_the_timeout_is_one_budget_for_every_round_but_pauses_are_free(server: ServerProcess) -> None:
    code = "import time\ntime.sleep(1.2)\nawait t()\ntime.sleep(1.2)\nprint('never')"
    first = ptc(server, code=code, tools=[{"name": "t"}], timeout=2000)
    assert first["status"] == "tool_call_required"
    time.sleep(1.5)  # the client's time with its tools does not count
    done = answer(server, first)
    assert (done["status"], done["error"], done["stdout"]) == ("error", "Execution timed out after 2 seconds", "")
    # Within the budget, the same shape completes.
    quick = ptc(server, code=code.replace("1.2", "0.2").replace("'never'", "'done'"), tools=[{"name": "t"}],
                timeout=2000)  # fmt: skip
    assert answer(server, quick)["stdout"] == "done\n"


def test_the_round_limit_ends_the_run(server: ServerProcess) -> None:
    reply = ptc(server, code="for i in range(10):\n    await t(i=i)", tools=[{"name": "t"}])
    for _ in range(MAX_ROUNDS - 1):
        reply = answer(server, reply)
    done = answer(server, reply)
    assert (done["status"], done["error"]) == ("error", f"Maximum round trips ({MAX_ROUNDS}) exceeded")


# --- tokens -------------------------------------------------------------------------------------------------


def test_tokens_are_single_use_bound_to_their_principal_and_expire(server: ServerProcess) -> None:
    invalid = "Invalid or expired continuation token"
    assert ptc(server, continuation_token="made-up", tool_results=[])["error"] == invalid
    first = ptc(server, code="print(await t())", tools=[{"name": "t"}])
    results = [{"call_id": first["tool_calls"][0]["id"], "result": 5}]
    # Another principal's request does not find the token, and does not use it up.
    foreign = ptc(server, key=OTHER_KEY, continuation_token=first["continuation_token"], tool_results=results)
    assert (foreign["status"], foreign["error"], foreign["session_id"]) == ("error", invalid, None)
    assert ptc(server, continuation_token=first["continuation_token"], tool_results=results)["stdout"] == "5\n"
    used = ptc(server, continuation_token=first["continuation_token"], tool_results=results)
    assert used["error"] == invalid
    # A token left longer than PTC_TOKEN_TTL_SECONDS is gone; the paused run with it.
    paused = ptc(server, code="print(await t())", tools=[{"name": "t"}])
    time.sleep(TOKEN_TTL_S + 3)
    assert answer(server, paused)["error"] == invalid
    # ... and its session is free again: the lease it held ended with it.
    assert server.exec("print('free')", "py", session_id=paused["session_id"], timeout_s=15)["stdout"] == "free\n"


# --- cancel -------------------------------------------------------------------------------------------------


def test_cancel_ends_a_paused_run_and_a_running_one(server: ServerProcess) -> None:
    request_id = secrets.token_hex(8)
    header = {"X-LibreChat-Code-Request-ID": request_id}
    first = ptc(server, headers=header, code="print(await t())", tools=[{"name": "t"}])
    cancel = httpx.post(f"{server.url}/exec/programmatic/cancel", json={"request_id": request_id},
                        headers=server.headers)  # fmt: skip
    assert cancel.json() == {"request_id": request_id, "cancelled": True}
    assert answer(server, first)["error"] == "The run was cancelled"
    # A run that is executing stops where it is.
    running_id = secrets.token_hex(8)
    replies: list[dict[str, Any]] = []
    worker = threading.Thread(
        target=lambda: replies.append(
            ptc(server, headers={"X-LibreChat-Code-Request-ID": running_id}, code="import time\ntime.sleep(15)")
        )
    )
    worker.start()
    time.sleep(1.5)
    cancel = httpx.post(f"{server.url}/exec/programmatic/cancel", headers={**server.headers,
                        "X-LibreChat-Code-Request-ID": running_id}, json={})  # fmt: skip
    assert cancel.json()["cancelled"] is True
    worker.join(20)
    assert replies[0]["error"] == "The run was cancelled"  # a run left alone would have completed
    unknown = httpx.post(f"{server.url}/exec/programmatic/cancel", json={"request_id": "nope"}, headers=server.headers)
    assert unknown.json()["cancelled"] is False
    assert server.healthy()
    assert server.wait_clean() == {"run_dirs": [], "cgroups": [], "processes": []}  # the cancelled kernels are gone


# --- bash ---------------------------------------------------------------------------------------------------


def test_bash_tools_are_functions_taking_and_printing_json(server: ServerProcess) -> None:
    code = ('echo start\nw=$(get_weather \'{"city": "NYC"}\')\necho "got $w"\n'
            "echo $w | jq -r .temp\nbroken '{}' || echo \"failed with $?\"\nplain 'not json'")  # fmt: skip
    first = ptc(server, lang="bash", code=code, tools=[{"name": "get-weather"}, {"name": "broken"}, {"name": "plain"}])
    assert names(first) == [("get-weather", {"city": "NYC"})]
    second = answer(server, first, lambda call: {"temp": 21})
    assert names(second) == [("broken", {})]
    third = ptc(
        server,
        continuation_token=second["continuation_token"],
        tool_results=[{"call_id": second["tool_calls"][0]["id"], "is_error": True, "error_message": "no"}],
    )
    assert names(third) == [("plain", "not json")]
    done = answer(server, third, lambda call: "ok")
    assert done["status"] == "completed"
    assert done["stdout"] == 'start\ngot {"temp": 21}\n21\n{"error": "no"}\nfailed with 1\n"ok"\n'
    failing = ptc(server, lang="bash", code="echo out; exit 3")
    assert (failing["status"], failing["error"], failing["stdout"]) == ("error", "bash exited with code 3", "out\n")


# --- files and state ----------------------------------------------------------------------------------------


def test_files_go_in_and_come_out_and_variables_persist(server: ServerProcess) -> None:
    upload = httpx.post(f"{server.url}/upload", files={"file": ("data.csv", b"a,b\n1,2\n")}, headers=server.headers)
    file = upload.json()["files"][0]
    ref = {"id": file["fileId"], "name": "data.csv", "session_id": upload.json()["session_id"]}
    code = ("rows = open('data.csv').read().splitlines()\n"
            "summary = await summarise(rows=rows)\n"
            "open('summary.txt', 'w').write(summary)\nprint(len(rows))")  # fmt: skip
    first = ptc(server, code=code, tools=[{"name": "summarise"}], files=[ref])
    assert names(first) == [("summarise", {"rows": ["a,b", "1,2"]})]
    done = answer(server, first, lambda call: "two rows")
    assert (done["status"], done["stdout"]) == ("completed", "2\n")
    (made,) = [f for f in done["files"] if f["name"] == "summary.txt"]
    download = httpx.get(f"{server.url}/download/{done['session_id']}/{made['id']}", headers=server.headers)
    assert download.content == b"two rows"
    # The run's variables are the session's, like any run's (and its tools are not left behind).
    later = server.exec("print(summary, len(rows), 'summarise' in dir())", "py", session_id=done["session_id"])
    assert later["stdout"] == "two rows 2 False\n"


# --- elsewhere: another node, a restart -----------------------------------------------------------------


LONGER = {**SETTINGS, "PTC_TOKEN_TTL_SECONDS": "60"}  # a restart takes a few seconds
REPLAYED = ("import random\nprint('before')\nx = await t(n=1)\nprint('between', x)\ny = await t(n=2)\n"
            "open('out.txt', 'w').write(str(x + y))\nprint('after', x + y, base)")  # fmt: skip


def run_elsewhere(start: ServerProcess, finish: ServerProcess, between: Callable[[], None] = lambda: None) -> None:
    """A run paused twice on ``start`` and continued on ``finish``: replayed there from the state it began with."""
    base = start.exec("base = 100", "py")
    sid = base["session_id"]
    first = ptc(start, code=REPLAYED, tools=[{"name": "t"}], session_id=sid)
    second = answer(start, first, lambda call: 1)  # the first round on the start node, live
    between()
    done = answer(finish, second, lambda call: 2)
    # Code before the last pause ran again on the other node, but its output is there once.
    assert (done["status"], done["stdout"]) == ("completed", "before\nbetween 1\nafter 3 100\n"), done
    assert [f["name"] for f in done["files"]] == ["out.txt"]
    assert finish.exec("print(x, y, base)", "py", session_id=sid)["stdout"] == "1 2 100\n"
    # A replay that asks for other calls than were recorded is refused.
    drifting = ptc(start, code="import random\nawait t(n=random.random())\nawait t()", tools=[{"name": "t"}],
                   session_id=sid)  # fmt: skip
    paused = answer(start, drifting)
    between()
    refused = answer(finish, paused)
    assert refused["status"] == "error"
    assert "asked for different tool calls than were recorded (round 1)" in refused["error"]
    # Both nodes are free to run the session afterwards: no lease was left behind.
    assert start.exec("print(base)", "py", session_id=sid, timeout_s=15)["stdout"] == "100\n"


def test_a_run_continues_on_another_node(bases: tuple[Path, Path], request: pytest.FixtureRequest) -> None:
    stores = shared_stores(request, "ptc-nodes")
    node_a, node_b = ServerProcess(bases[0], **LONGER, **stores), ServerProcess(bases[1], **LONGER, **stores)
    node_a.start()
    node_b.start()
    try:
        run_elsewhere(node_a, node_b)
    finally:
        assert node_a.stop() == 0
        assert node_b.stop() == 0


def test_a_run_continues_after_a_restart(bases: tuple[Path, Path]) -> None:
    node = ServerProcess(bases[0], **LONGER)
    node.start()

    def restart() -> None:
        assert node.stop() == 0
        node.start()

    try:
        run_elsewhere(node, node, restart)
    finally:
        node.stop()


def test_a_run_whose_paused_kernel_was_evicted_is_replayed_on_the_same_node() -> None:
    # MAX_LIVE_KERNELS=0: a parked kernel is evicted at once, so every continuation replays here, under the
    # lease the paused run still holds.
    with serving("interp-ptc-evict-", **SETTINGS, MAX_LIVE_KERNELS="0") as node:
        first = ptc(
            node, code="print('start')\na = await t(n=1)\nb = await t(n=2)\nprint(a + b)", tools=[{"name": "t"}]
        )
        second = answer(node, first, lambda call: call["input"]["n"] * 10)
        assert names(second) == [("t", {"n": 2})]
        done = answer(node, second, lambda call: call["input"]["n"] * 10)
        assert (done["status"], done["stdout"]) == ("completed", "start\n30\n")
        stats = httpx.get(f"{node.url}/health/detailed", headers=node.headers).json()["services"]["programmatic"]
        assert stats["details"]["replayed"] == 2
        assert node.exec("print(a, b)", "py", session_id=done["session_id"], timeout_s=15)["stdout"] == "10 20\n"
