"""The zygote's life: it rotates without touching live kernels, and one that dies is replaced while the
sessions of its kernels come back from their checkpoints. (Kernels themselves are tested in both modes in
test_kernels.py; attacks in tests/exploits/.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from interpreter.errors import ServiceUnavailable
from interpreter.execution.setup import open_execution
from interpreter.settings import load_settings
from tests.conftest import ServerProcess, serving

pytestmark = pytest.mark.nsjail

ROTATE_AFTER = 3


def zygote(server: ServerProcess) -> dict[str, Any]:
    services = httpx.get(f"{server.url}/health/detailed", headers=server.headers, timeout=10).json()["services"]
    found: dict[str, Any] = services["kernels"]["details"]["zygote"]
    return found


def wait_for(server: ServerProcess, condition: Any, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not condition(state := zygote(server)):
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


def test_rotation_re_executes_the_zygote_and_keeps_live_kernels() -> None:
    with serving("interp-zygote-rot-", KERNEL_MODE="zygote", ZYGOTE_ROTATE_SESSIONS=str(ROTATE_AFTER),
                 SANDBOX_POOL_PY="0") as server:  # fmt: skip
        kept = server.exec("x = 'alive'\nprint(hash('same text'))", "py")
        before = wait_for(server, lambda z: z["ready"])
        for _ in range(ROTATE_AFTER):
            server.exec("print(1)", "py")
        after = wait_for(server, lambda z: z["ready"] and z["rotations"] >= 1)
        assert after["pid"] == before["pid"]  # re-executed in place: still the jail's pid 1
        again = server.exec("print(x)", "py", session_id=kept["session_id"])
        assert (again["stdout"], again["runtime_status"]) == ("alive\n", "reused")  # its live kernel lived on
        fresh = server.exec("print(hash('same text'))", "py")
        assert fresh["stdout"] != kept["stdout"].split("\n", 1)[1]  # a new image: a new hash secret


def test_a_dead_zygote_is_replaced_and_its_sessions_restored() -> None:
    with serving("interp-zygote-kill-", KERNEL_MODE="zygote") as server:
        kept = server.exec("x = 'checkpointed'", "py")
        first = wait_for(server, lambda z: z["ready"])
        os.kill(first["pid"], signal.SIGKILL)  # its jail, and every kernel it forked, go with it
        wait_for(server, lambda z: z["ready"] and z["pid"] != first["pid"])
        again = server.exec("print(x)", "py", session_id=kept["session_id"])
        assert (again["stdout"], again["runtime_status"]) == ("checkpointed\n", "restored")
        assert server.exec("print('new')", "py")["stdout"] == "new\n"
        assert zygote(server)["started"] == 2


async def test_a_zygote_that_is_not_up_fails_kernel_starts_not_the_pool(work_dir: Path) -> None:
    """KERNEL_MODE=zygote and no zygote: starts are refused with a 503, refills fail quietly, and the pool
    keeps running (and retrying)."""
    settings = load_settings({"SANDBOX_BASE_DIR": str(work_dir / "sb"), "DATA_DIR": str(work_dir / "data"),
                              "KERNEL_MODE": "zygote", "REPL_WARMUP_TIMEOUT_SECONDS": "0.5",
                              "SANDBOX_POOL_WARMUP_ON_STARTUP": "true"}, env_file=None)  # fmt: skip
    with open_execution(settings) as execution:
        pool = execution.kernels
        assert pool is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)  # the zygote's own service is never started
            with pytest.raises(ServiceUnavailable):
                await pool.take()
            for _ in range(600):  # the warm-up's refills fail meanwhile, and the pool goes on trying (up to 30 s)
                if pool.statistics()["start_failures"] >= 2:
                    break
                await trio.sleep(0.05)
            assert pool.statistics()["start_failures"] >= 2
            nursery.cancel_scope.cancel()
