"""POST /exec through a real server: the reply's shape, bad input, keepalives, limits, admission, cleanup."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerProcess, open_dir

pytestmark = pytest.mark.nsjail

RESPONSE_KEYS = {"session_id", "files", "stdout", "stderr", "exit_code", "status", "duration_ms", "language",
                 "truncated", "runtime_session_id", "runtime_status", "deleted_files", "state_warnings"}  # fmt: skip


@pytest.fixture(scope="module")
def tight() -> Iterator[ServerProcess]:
    """A server with one run slot, a queue of one and a 3 s ceiling."""
    base = open_dir("interp-tight-")
    instance = ServerProcess(base, MAX_EXECUTION_TIME="3", MAX_CONCURRENT_RUNS="1", RUN_QUEUE_SIZE="1")
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(base, ignore_errors=True)


def post(server: ServerProcess, body: dict[str, object], path: str = "/exec", timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=timeout)


def test_reply_shape_and_verbatim_output(server: ServerProcess) -> None:
    result = server.exec("printf '  lead\\n\\ntrail  '; printf 'warn\\n' >&2; exit 3", "bash")
    assert set(result) == RESPONSE_KEYS
    assert result["stdout"] == "  lead\n\ntrail  "  # not stripped, nothing appended
    assert result["stderr"] == "warn\n"
    assert result["exit_code"] == 3
    assert result["status"] == "error"
    assert result["language"] == "bash"
    assert result["files"] == []
    assert result["truncated"] is False
    assert len(result["session_id"]) == 21
    assert result["runtime_session_id"] == result["session_id"]
    assert result["runtime_status"] == "new"
    assert 0 < result["duration_ms"] < 10_000


def test_v1_prefix_and_case_insensitive_language(server: ServerProcess) -> None:
    response = post(server, {"code": "echo ok", "lang": "BASH"}, path="/v1/exec")
    assert response.json()["stdout"] == "ok\n"


def test_unknown_fields_are_ignored(server: ServerProcess) -> None:
    body = {"code": "echo ok", "lang": "bash", "user_id": "u1", "entity_id": "asst_1", "files": [],
            "session_id": "does-not-exist", "toolCallId": "x", "conversationId": "y"}  # fmt: skip
    assert post(server, body).json()["status"] == "ok"


def test_stdin_and_args(server: ServerProcess) -> None:
    result = server.exec('read a; read b; echo "$a|$b|$1|$2"', "bash", stdin="x\ny\n", args=["p q", "r"])
    assert result["stdout"] == "x|y|p q|r\n"
    no_stdin = server.exec("cat; echo done", "bash")  # empty stdin: EOF at once, no hang
    assert no_stdin["stdout"] == "done\n"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"code": "print(1)", "lang": "cobol"}, 400, "unsupported_language"),
        ({"code": "   \n", "lang": "py"}, 400, "empty_code"),
        ({"lang": "py"}, 422, "missing"),
        ({"code": "print(1)"}, 422, "missing"),
        ({"code": "print(1)", "lang": "py", "timeout": 999}, 422, "greater_than_equal"),
        ({"code": "print(1)", "lang": "py", "timeout": 300_001}, 422, "less_than_equal"),
        ({"code": "print(1)", "lang": "py", "entity_id": "bad id!"}, 422, "value_error"),
        ({"code": "print(1)", "lang": "py", "files": [{"id": "f"}]}, 422, "missing"),
        ({"code": 5, "lang": "py"}, 422, "string_type"),
        ({"code": "print(1)", "lang": "py", "args": ["a\u0000b"]}, 400, "invalid_args"),
    ],
)
def test_bad_requests(server: ServerProcess, body: dict[str, object], status: int, code: str) -> None:
    response = post(server, body)
    assert response.status_code == status
    envelope = response.json()
    assert envelope["error_type"] == "validation"
    assert envelope["details"][0]["code"] == code


def test_malformed_json_and_wrong_content_type(server: ServerProcess) -> None:
    broken = httpx.post(f"{server.url}/exec", content=b'{"code": ', headers={**server.headers,
                        "content-type": "application/json"})  # fmt: skip
    assert broken.status_code == 422
    assert broken.json()["details"][0]["code"] == "json_invalid"
    xml = httpx.post(f"{server.url}/exec", content=b"<x/>", headers={**server.headers, "content-type": "text/xml"})
    assert xml.status_code == 415
    assert server.healthy()


def test_slow_reply_starts_with_keepalives(server: ServerProcess) -> None:
    with httpx.stream("POST", f"{server.url}/exec", json={"code": "sleep 5; echo late", "lang": "bash"},
                      headers=server.headers, timeout=30) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        chunks = response.iter_raw()
        body = next(chunks)
        # Causal, not timed: when the first byte is here, the program is still running.
        sandbox = httpx.get(f"{server.url}/health/detailed", headers=server.headers, timeout=10).json()
        assert sandbox["services"]["sandbox"]["details"]["running"] == 1
        body += b"".join(chunks)
    assert body.startswith(b" ")
    result = httpx.Response(200, content=body).json()  # leading whitespace is valid JSON
    assert result["stdout"] == "late\n"


def test_timeout_keeps_partial_output(server: ServerProcess) -> None:
    result = server.exec("echo before; sleep 30", "bash", timeout=1000)
    assert result["status"] == "timeout"
    assert result["stdout"] == "before\n"
    assert "timed out after 1 s" in result["stderr"]
    assert result["duration_ms"] < 6000
    assert server.wait_clean() == {"run_dirs": [], "cgroups": [], "processes": []}


def test_request_timeout_is_clamped_to_max_execution_time(tight: ServerProcess) -> None:
    result = tight.exec("sleep 30", "bash", timeout=300_000)
    assert result["status"] == "timeout"
    assert "after 3 s" in result["stderr"]


def test_queue_full_is_503_with_retry_after_and_health_answers_meanwhile(tight: ServerProcess) -> None:
    results: list[int] = []

    def slow() -> None:
        results.append(post(tight, {"code": "sleep 2", "lang": "bash"}).status_code)

    threads = [threading.Thread(target=slow) for _ in range(2)]  # one runs, one waits
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    refused = post(tight, {"code": "echo never", "lang": "bash"})
    health = httpx.get(f"{tight.url}/health/detailed", headers=tight.headers, timeout=10)
    for thread in threads:
        thread.join()
    assert refused.status_code == 503
    assert refused.json()["error_type"] == "service_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    assert health.status_code == 200  # answered while the runs were busy (not after them):
    assert (
        health.json()["services"]["sandbox"]["details"] | {"running": 1, "waiting": 1}
        == health.json()["services"]["sandbox"]["details"]
    )
    assert results == [200, 200]


def test_client_disconnect_cancels_the_run(server: ServerProcess) -> None:
    marker = "/tmp/still-running"
    with httpx.stream("POST", f"{server.url}/exec", json={"code": f"sleep 60; echo > {marker}", "lang": "bash"},
                      headers=server.headers, timeout=30) as response:  # fmt: skip
        assert next(response.iter_raw()) == b" "  # the run is under way; now hang up
    # Cancelled, not left to reach the 20 s limit: gone within wait_clean's 10 s.
    assert server.wait_clean(timeout_s=10) == {"run_dirs": [], "cgroups": [], "processes": []}
    assert server.healthy()


def test_concurrent_runs_are_isolated_and_all_complete(server: ServerProcess) -> None:
    outputs: dict[int, str] = {}

    def run(i: int) -> None:
        outputs[i] = server.exec(f"echo {i} > mine; sleep 0.3; cat mine; ls /mnt/data | wc -l", "bash")["stdout"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each run saw only its own file (and its source): a private /mnt/data per run.
    assert outputs == {i: f"{i}\n2\n" for i in range(8)}
    assert server.wait_clean() == {"run_dirs": [], "cgroups": [], "processes": []}


def test_network_isolation_off_shares_the_host_network() -> None:
    """ENABLE_NETWORK_ISOLATION=false means what an operator expects: the host's network (with a loud warning)."""
    import socket

    base = open_dir("interp-net-")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    shared = ServerProcess(base, ENABLE_NETWORK_ISOLATION="false")
    shared.start()
    try:
        code = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
        assert shared.exec(code, "bash")["stdout"] == "connected\n"
        security = httpx.get(f"{shared.url}/health/detailed", headers=shared.headers).json()["services"]["security"]
        assert security["status"] == "degraded"
    finally:
        shared.stop()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)
