"""The supervision policy, in virtual time: fail fast before ready, heal with capped backoff after."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from supervisors.supervise import Backoff, ServiceBoard, supervise


class Flaky:
    """A service whose nth start crashes (before or after started(), as configured)."""

    def __init__(self, *, crash_before_ready: set[int] = frozenset(), crash_after: dict[int, float] | None = None):
        self.starts: list[float] = []
        self.crash_before_ready = crash_before_ready
        self.crash_after = crash_after or {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        n = len(self.starts)
        if n in self.crash_before_ready:
            raise OSError("boom before ready")
        task_status.started()
        if n in self.crash_after:
            await trio.sleep(self.crash_after[n])
            raise RuntimeError("boom at runtime")
        await trio.sleep_forever()


async def test_crash_before_first_ready_propagates(autojump_clock: trio.testing.MockClock) -> None:
    service = Flaky(crash_before_ready={1})
    board = ServiceBoard()
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="before ready"), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(supervise, service.run, name="svc", board=board))
    assert board.services["svc"].state == "starting"


async def test_runtime_crashes_restart_with_growing_backoff(autojump_clock: trio.testing.MockClock) -> None:
    # Start 1 crashes at t=1; start 2 crashes before ready; start 3 runs.
    service = Flaky(crash_after={1: 1.0}, crash_before_ready={2})
    board = ServiceBoard()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(supervise, service.run, name="svc", board=board, backoff=Backoff(2, 8)))
        assert board.healthy()
        await trio.sleep(1.5)
        assert board.services["svc"].state == "restarting"
        assert not board.healthy()
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    t0 = service.starts[0]
    assert [round(t - t0, 3) for t in service.starts] == [0, 3.0, 7.0]  # 1 s run + 2 s, then +4 s (doubled)
    assert board.services["svc"].restarts == 2
    assert board.services["svc"].state == "running"
    assert board.services["svc"].last_error == "OSError"


async def test_backoff_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    service = Flaky(crash_after={1: 0}, crash_before_ready=set(range(2, 8)))
    board = ServiceBoard()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(supervise, service.run, name="svc", board=board, backoff=Backoff(1, 4)))
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in zip(service.starts, service.starts[1:], strict=False)]
    assert gaps[:6] == [1, 2, 4, 4, 4, 4]


async def test_cancellation_passes_through(autojump_clock: trio.testing.MockClock) -> None:
    service = Flaky()
    board = ServiceBoard()
    with trio.move_on_after(5) as scope:
        await supervise(service.run, name="svc", board=board)
    assert scope.cancelled_caught
    assert len(service.starts) == 1
