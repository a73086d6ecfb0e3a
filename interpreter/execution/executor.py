"""Admission and ownership of runs: at most MAX_CONCURRENT_RUNS execute, RUN_QUEUE_SIZE wait, the rest get 503.

Runs execute in the executor's own nursery (a service of the supervision tree, not a request's),
so a slow run can outlive the request's first three seconds and be answered with keepalives, and
shutdown cancels every run after HTTP has drained. A request that goes away cancels its run.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

import trio

from interpreter.errors import ServiceUnavailable
from interpreter.execution.runner import OnOutput, Runner

log = logging.getLogger("interpreter.execution")

T = TypeVar("T")
# A run: an async generator that yields its result once (the reply: a RunResult, or a programmatic
# run's reply), then may go on with work the reply does not wait for (storing a Python checkpoint)
# in the same run slot.
Work = Callable[[OnOutput | None], AsyncGenerator[T, None]]

RETRY_AFTER_S = 2


class QueueFull(ServiceUnavailable):
    message = "Too many runs are waiting; retry shortly"


@dataclass
class RunHandle(Generic[T]):
    """A submitted run: wait for its result, or cancel it."""

    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def wait(self) -> T:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise ServiceUnavailable("The run was cancelled")
        return self.result

    def cancel(self) -> None:
        self.scope.cancel()


class Executor:
    def __init__(self, runner: Runner, *, max_concurrent: int, queue_size: int) -> None:
        self.runner = runner
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self._slots = trio.Semaphore(max_concurrent)
        self._waiting = 0
        self._running = 0
        self._nursery: trio.Nursery | None = None
        self.completed = 0

    def statistics(self) -> dict[str, int]:
        return {
            "running": self._running,
            "waiting": self._waiting,
            "max_concurrent": self.max_concurrent,
            "queue_size": self.queue_size,
            "completed": self.completed,
        }

    def submit(self, work: Work[T], on_output: OnOutput | None = None) -> RunHandle[T]:
        """Start ``work`` now or queue it; decided synchronously, before any byte of a reply is sent.

        Raises:
            QueueFull: every slot is busy and the queue is full (503 with Retry-After).
            ServiceUnavailable: the executor is not running (starting up or shutting down).
        """
        if self._nursery is None:
            raise ServiceUnavailable("The server is not accepting runs right now", retry_after_s=RETRY_AFTER_S)
        if self._slots.value == 0 and self._waiting >= self.queue_size:
            raise QueueFull(retry_after_s=RETRY_AFTER_S)
        handle: RunHandle[T] = RunHandle()
        self._waiting += 1
        self._nursery.start_soon(self._execute, work, on_output, handle)
        return handle

    async def _execute(self, work: Work[Any], on_output: OnOutput | None, handle: RunHandle[Any]) -> None:
        queued = True
        try:
            async with contextlib.AsyncExitStack() as stack:
                with handle.scope:  # the request may cancel the run until its result exists, not after
                    await stack.enter_async_context(self._slots)
                    self._waiting -= 1
                    queued = False
                    self._running += 1
                    stack.callback(self._finished)
                    steps = await stack.enter_async_context(contextlib.aclosing(work(on_output)))
                    handle.result = await anext(steps)
                handle.done.set()
                try:
                    async for _ in steps:  # the rest of the work, after the reply
                        pass
                except Exception:
                    log.exception("a run failed after its reply")
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request, which maps it to a status
            handle.error = exc
        finally:
            if queued:
                self._waiting -= 1
            handle.done.set()

    def _finished(self) -> None:
        self._running -= 1
        self.completed += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """The service: owns the nursery runs execute in, and the launcher pool beside them.

        Ready at once; cancelling it cancels every run and discards every prepared launcher.
        """
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.runner.launchers.run)
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None


def default_concurrency(setting: int, cores: int | None) -> int:
    """MAX_CONCURRENT_RUNS=0 means two per core."""
    return setting if setting > 0 else 2 * max(1, cores or 1)


async def wait_or_timeout(handle: RunHandle[Any], seconds: float) -> bool:
    """True when the run finished within ``seconds``."""
    with trio.move_on_after(seconds):
        await handle.done.wait()
    return handle.done.is_set()


def clamp_timeout_s(requested_ms: int | None, max_s: int) -> int:
    """The request's timeout (ms) rounded up to seconds, never above MAX_EXECUTION_TIME."""
    if requested_ms is None:
        return max_s
    return max(1, min(max_s, math.ceil(requested_ms / 1000)))
