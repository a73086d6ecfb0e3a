"""Python kernels through the real API: the protocol against hostile code, the semantics, live state,
checkpoints across eviction and restarts, the pool, and runs of one session one at a time.

Two nodes sharing Redis + S3 are in tests/stores/test_server_kernels.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, serving

pytestmark = pytest.mark.nsjail


@pytest.fixture(scope="module", params=["zygote", "nsjail"])
def kernels(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A server per KERNEL_MODE: kernels forked by the zygote, or each in a fresh nsjail."""
    with serving("interp-kernels-", MAX_EXECUTION_TIME="20", KERNEL_MODE=request.param) as instance:
        yield instance


def py(server: ServerProcess, code: str, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/exec", json={"code": code, "lang": "py", **fields}, headers=server.headers,
                          timeout=120)  # fmt: skip
    assert response.status_code == 200, server.log_tail(60)
    result: dict[str, Any] = response.json()
    return result


def details(server: ServerProcess) -> dict[str, Any]:
    health = httpx.get(f"{server.url}/health/detailed", headers=server.headers, timeout=10).json()
    result: dict[str, Any] = health["services"]["kernels"]["details"]
    return result


# --- the protocol against hostile code ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "exit_code", "in_stderr"),
    [
        ("import sys; sys.exit(3)", "error", 3, ""),
        ("raise SystemExit('bye')", "error", 1, "bye"),
        ("raise KeyboardInterrupt", "error", 1, "KeyboardInterrupt"),
        ("import os, sys; os.close(0); os.close(1); os.close(2); sys.stdout.close()", "ok", 0, ""),
        ("def f(): return f()\nf()", "error", 1, "RecursionError"),
        ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)", "ok", 0, ""),
    ],
    ids=["sys.exit", "SystemExit-text", "KeyboardInterrupt", "closed-stdio", "recursion", "sigint-ignored"],
)
def test_hostile_code_cannot_break_the_kernel(kernels: ServerProcess, code: str, status: str, exit_code: int,
                                              in_stderr: str) -> None:  # fmt: skip
    first = py(kernels, "kept = 'alive'")
    run = py(kernels, code, session_id=first["session_id"])
    assert (run["status"], run["exit_code"]) == (status, exit_code), run
    assert in_stderr in run["stderr"]
    after = py(kernels, "print(kept)", session_id=first["session_id"])
    assert (after["stdout"], after["runtime_status"]) == ("alive\n", "reused")  # the same live kernel


@pytest.mark.parametrize(
    ("code", "status", "note"),
    [
        ("import os; os._exit(0)", "error", "The Python kernel stopped during the run"),
        ("import time\nwhile True:\n    try:\n        time.sleep(60)\n    except BaseException:\n        pass",
         "timeout", "the kernel had to be stopped"),
        ("import ctypes; ctypes.string_at(0)", "error", "The Python kernel stopped during the run"),
    ],
    ids=["os._exit", "swallowed-interrupt", "segfault"],
)  # fmt: skip
def test_a_kernel_that_dies_or_will_not_stop_is_replaced(kernels: ServerProcess, code: str, status: str,
                                                         note: str) -> None:  # fmt: skip
    first = py(kernels, "kept = 'saved'")
    run = py(kernels, code, session_id=first["session_id"], timeout=2000)
    assert run["status"] == status
    assert run["exit_code"] is None
    assert note in run["stderr"]
    after = py(kernels, "print(kept)", session_id=first["session_id"])
    assert (after["stdout"], after["runtime_status"]) == ("saved\n", "restored")  # from the checkpoint
    assert kernels.healthy()


def test_output_is_captured_at_the_fd_level_in_order(kernels: ServerProcess) -> None:
    code = (
        "import os, subprocess, ctypes\n"
        "print('1 print', flush=True)\n"
        "os.write(1, b'2 os.write\\n')\n"
        "os.system('echo 3 os.system')\n"
        "subprocess.run(['echo', '4 subprocess'])\n"
        "libc = ctypes.CDLL(None); libc.printf(b'5 C printf\\n'); libc.fflush(None)\n"
        "_ = os.write(2, b'to stderr\\n')"
    )
    run = py(kernels, code)
    assert run["stdout"] == "1 print\n2 os.write\n3 os.system\n4 subprocess\n5 C printf\n"
    assert run["stderr"] == "to stderr\n"


def test_output_over_the_cap_stops_the_cell_not_the_session(kernels: ServerProcess) -> None:
    first = py(kernels, "kept = 1")
    run = py(kernels, "while True: print('x' * 1000)", session_id=first["session_id"])
    assert (run["status"], run["truncated"]) == ("output_limit", True)
    assert len(run["stdout"]) == 1024 * 1024
    assert py(kernels, "print(kept)", session_id=first["session_id"])["stdout"] == "1\n"


def test_a_garbage_frame_ends_the_kernel_and_the_session_goes_on(kernels: ServerProcess) -> None:
    first = py(kernels, "kept = 'still here'")
    run = py(kernels, "import os\nfor fd in range(100, 256):\n    try: os.write(fd, b'\\xff' * 64)\n"
                      "    except OSError: pass\nimport time; time.sleep(30)",
             session_id=first["session_id"], timeout=4000)  # fmt: skip
    assert run["status"] in ("error", "timeout")
    after = py(kernels, "print(kept)", session_id=first["session_id"])
    assert (after["stdout"], after["runtime_status"]) == ("still here\n", "restored")


# --- semantics ------------------------------------------------------------------------------------------------


def test_jupyter_style_semantics(kernels: ServerProcess) -> None:
    run = py(kernels, "x = 6 * 7\nx")
    assert run["stdout"] == "42\n"
    assert py(kernels, "None")["stdout"] == ""
    assert py(kernels, "[np.__name__, pd.__name__, plt.__name__, json.__name__, datetime.__name__, "
                       "pathlib.__name__, collections.__name__, itertools.__name__, functools.__name__, "
                       "re.__name__, math.__name__, os.__name__, sys.__name__]")["stdout"] == (
        "['numpy', 'pandas', 'matplotlib.pyplot', 'json', 'datetime', 'pathlib', 'collections', 'itertools', "
        "'functools', 're', 'math', 'os', 'sys']\n"
    )  # fmt: skip
    lazy = py(kernels, "import sys\nbefore = 'scipy.stats' in sys.modules\nsp.stats.norm.cdf(0), before")
    assert lazy["stdout"] == "(np.float64(0.5), False)\n"  # bound lazily, imported on first use
    assert py(kernels, "await __import__('asyncio').sleep(0)\n'awaited'")["stdout"] == "'awaited'\n"
    assert py(kernels, "import asyncio\nasync def f(): return 5\nasyncio.run(f())")["stdout"] == "5\n"
    assert py(kernels, "import os, sys\nos.getcwd(), sys.argv", args=["a b", "c"])["stdout"] == (
        "('/mnt/data', ['code.py', 'a b', 'c'])\n"
    )
    assert py(kernels, "input()", stdin="typed\n")["stdout"] == "'typed'\n"


def test_tracebacks_show_only_the_users_frames(kernels: ServerProcess) -> None:
    run = py(kernels, "def inner():\n    raise ValueError('boom')\ninner()")
    assert run["stderr"] == (
        "Traceback (most recent call last):\n"
        '  File "<code>", line 3, in <module>\n    inner()\n'
        "  File \"<code>\", line 2, in inner\n    raise ValueError('boom')\n"
        "ValueError: boom\n"
    )
    assert "kernel.py" not in py(kernels, "import time; time.sleep(5)", timeout=1000)["stderr"]


def test_open_and_shown_figures_come_back_as_png_files(kernels: ServerProcess) -> None:
    run = py(kernels, "plt.plot([1, 2, 3])\nplt.show()\nplt.figure()\nplt.bar([1], [2])\nprint('done')")
    names = sorted(f["name"] for f in run["files"])
    assert names == ["figure-1.png", "figure-2.png"]
    sid = run["session_id"]
    for entry in run["files"]:
        content = httpx.get(f"{kernels.url}/download/{sid}/{entry['id']}", headers=kernels.headers, timeout=30)
        assert content.content.startswith(b"\x89PNG\r\n\x1a\n")


# --- state ---------------------------------------------------------------------------------------------------


def test_unpicklable_objects_stay_alive_in_the_live_kernel_and_are_reported(kernels: ServerProcess) -> None:
    first = py(kernels, "f = open('/tmp/notes', 'w')\ngen = (i for i in range(3))\n"
                        "def make():\n    n = 10\n    return lambda: n\nfn = make()\nplain = [1, 2]")  # fmt: skip
    warned = " ".join(first["state_warnings"])
    assert "f: not saved" in warned
    assert "gen: not saved" in warned
    assert "plain" not in warned
    assert "fn" not in warned  # cloudpickle keeps closures
    second = py(kernels, "f.write('x'); next(gen), fn(), plain", session_id=first["session_id"])
    assert second["stdout"] == "(0, 10, [1, 2])\n"


def test_runs_of_one_session_never_interleave(kernels: ServerProcess) -> None:
    sid = py(kernels, "events = []")["session_id"]
    code = "import time\nevents.append(('start', time.time()))\ntime.sleep(0.5)\nevents.append(('end', time.time()))"
    threads = [threading.Thread(target=py, args=(kernels, code), kwargs={"session_id": sid}) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run = py(kernels, "[name for name, _ in events], all(a[1] <= b[1] for a, b in zip(events, events[1:]))",
             session_id=sid)  # fmt: skip
    assert run["stdout"] == "(['start', 'end', 'start', 'end', 'start', 'end'], True)\n"


def test_librechat_style_calls_keep_variables_through_file_refs(kernels: ServerProcess) -> None:
    """No session_id: the client only sends back the files of the last reply (and a user_id)."""
    first = py(kernels, "total = 40\n_ = open('out.txt', 'w').write('x')", user_id="user-7")
    refs = [{"id": f["id"], "session_id": f["session_id"], "name": f["name"]} for f in first["files"]]
    second = py(kernels, "total + 2", user_id="user-7", files=refs)
    assert (second["stdout"], second["session_id"]) == ("42\n", first["session_id"])
    stranger = py(kernels, "'total' in dir()", user_id="user-8", files=refs)
    assert stranger["stdout"] == "False\n"  # another user of the same key does not share it


def kill_every_kernel(server: ServerProcess) -> None:
    """SIGKILL the Python process of every kernel of ``server``: its sessions' and its idle pool's."""
    for run_id in details(server)["run_ids"]:
        for cgroup in Path("/sys/fs/cgroup/memory").glob(f"interpreter-*/run-{run_id}"):
            for pid in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it ended meanwhile
                    if Path(f"/proc/{pid}/comm").read_text().startswith("python"):
                        os.kill(int(pid), signal.SIGKILL)


def test_the_kernel_of_a_session_is_replaced_when_killed_from_outside(kernels: ServerProcess) -> None:
    first = py(kernels, "kept = 'checkpointed'")
    sid = first["session_id"]
    assert details(kernels)["run_ids"]

    def kill_the_running_kernel() -> None:
        time.sleep(1.5)
        kill_every_kernel(kernels)

    killer = threading.Thread(target=kill_the_running_kernel)
    killer.start()
    run = py(kernels, "import time\nprint('working', flush=True)\ntime.sleep(10)", session_id=sid)
    killer.join()
    assert run["status"] == "error"
    assert run["stdout"] == "working\n"  # what it printed before it died is kept
    assert "The Python kernel stopped during the run" in run["stderr"]
    assert py(kernels, "print(kept)", session_id=sid)["stdout"] == "checkpointed\n"


def test_kernels_killed_while_idle_are_not_handed_out(kernels: ServerProcess) -> None:
    """The session's kernel and the ready ones die between two runs; the next run (no pause) gets a live
    kernel with the session's checkpoint, and a new session a live kernel too."""
    sid = py(kernels, "kept = 'idle'")["session_id"]
    kill_every_kernel(kernels)
    again = py(kernels, "print(kept)", session_id=sid)
    assert (again["status"], again["stdout"], again["runtime_status"]) == ("ok", "idle\n", "restored"), again
    kill_every_kernel(kernels)
    assert py(kernels, "print('fresh')")["stdout"] == "fresh\n"


# --- servers of their own ---------------------------------------------------------------------------------------


def test_state_survives_a_restart_and_aliases_named_variables_too(work_dir: Path) -> None:
    server = ServerProcess(work_dir)
    server.start()
    try:
        sid = py(server, "json = {'shadowed': True}\ncount = 41")["session_id"]
    finally:
        assert server.stop() == 0
    server.start()
    try:
        run = py(server, "count + 1, json", session_id=sid)
        assert run["stdout"] == "(42, {'shadowed': True})\n"
        assert run["runtime_status"] == "restored"
    finally:
        server.stop()


def test_an_evicted_session_is_restored_from_its_checkpoint(work_dir: Path) -> None:
    server = ServerProcess(work_dir, MAX_LIVE_KERNELS="1")
    server.start()
    try:
        first = py(server, "a = 'first'")["session_id"]
        second = py(server, "b = 'second'")["session_id"]  # the only live slot goes to this one
        assert details(server)["evicted"] >= 1
        again = py(server, "a", session_id=first)
        assert (again["stdout"], again["runtime_status"]) == ("'first'\n", "restored")
        assert py(server, "b", session_id=second)["stdout"] == "'second'\n"
    finally:
        server.stop()


def test_without_the_repl_state_is_still_persisted(work_dir: Path) -> None:
    server = ServerProcess(work_dir, REPL_ENABLED="false")
    server.start()
    try:
        sid = py(server, "n = 1")["session_id"]
        for expected in (2, 3):
            run = py(server, "n += 1\nn", session_id=sid)
            assert (run["stdout"], run["runtime_status"]) == (f"{expected}\n", "restored")
        assert details(server)["live"] == 0
    finally:
        server.stop()


def test_the_pool_refills_after_it_runs_dry(work_dir: Path) -> None:
    server = ServerProcess(
        work_dir, SANDBOX_POOL_PY="1", SANDBOX_POOL_REPLENISH_INTERVAL="0.1", SANDBOX_POOL_WARMUP_ON_STARTUP="true"
    )
    server.start()
    try:
        deadline = time.monotonic() + 30
        while details(server)["ready"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        threads = [threading.Thread(target=py, args=(server, "print(1)")) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = details(server)
        assert stats["hits"] >= 1
        assert stats["misses"] >= 1  # three new sessions, one ready kernel
        while details(server)["ready"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert details(server)["ready"] == 1
    finally:
        server.stop()
