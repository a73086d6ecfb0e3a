"""Kernels waiting for a new session, kernels bound to a session, and the uid slots they hold.

- **Ready kernels** (SANDBOX_POOL_PY) are started before they are needed, in batches of
  SANDBOX_POOL_PARALLEL_BATCH. Taking one is the event that refills the pool (no polling); batches
  are at least SANDBOX_POOL_REPLENISH_INTERVAL apart, except that an exhausted pool refills at once
  (SANDBOX_POOL_EXHAUSTION_TRIGGER; with false, a miss does not trigger a refill either). A miss
  starts a kernel on the spot.
- **Live kernels** stay bound to their session after a run (a kernel never serves two sessions),
  or to a programmatic run paused in them, until idle for SANDBOX_TTL_MINUTES, within
  MAX_LIVE_KERNELS and KERNEL_MEMORY_BUDGET_MB; the least recently used go first.
- **Slots**: kernel slot *n* runs as uid SANDBOX_UID+2+n (DESIGN §1), so no two kernels share a uid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio

from interpreter.errors import ServiceUnavailable
from interpreter.execution.kernels import Kernel, KernelConfig, serve_kernel
from sandboxes.jail import Identity

log = logging.getLogger("interpreter.kernels")

SLOT_WAIT_S = 10  # for a slot of a kernel that is stopping


@dataclass(frozen=True)
class PoolConfig:
    size: int  # ready kernels kept (0: no pool)
    batch: int
    spacing_s: float
    exhaustion_trigger: bool
    warmup_on_start: bool
    max_live: int
    memory_budget_bytes: int
    idle_ttl_s: float
    base_uid: int
    keep_live: bool = True  # REPL_ENABLED=false: a kernel serves one run only
    spare: int = 1  # slots beyond live and ready kernels: new kernels start while evicted ones are cleaned up

    @property
    def slots(self) -> int:
        return self.max_live + self.size + self.spare


class KernelPool:
    def __init__(self, kernels: KernelConfig, config: PoolConfig, active: set[Path]) -> None:
        self.kernels, self.config, self.active = kernels, config, active
        self.live: dict[str, Kernel] = {}
        self._ready: list[Kernel] = []
        self._starting = 0
        self._free_slots = list(range(config.slots))
        self._slot_freed = trio.Event()
        self._wanted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._running: dict[int, Kernel] = {}  # by slot: every kernel whose jail exists
        self.counters = {"hits": 0, "misses": 0, "started": 0, "evicted": 0, "expired": 0, "start_failures": 0}

    def statistics(self) -> dict[str, object]:
        return {
            "ready": len(self._ready), "live": len(self.live), "starting": self._starting,
            "free_slots": len(self._free_slots), "pool_size": self.config.size, **self.counters,
            "run_ids": sorted(kernel.launch.run_id for kernel in self._running.values()),
        }  # fmt: skip

    # --- the service ---------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Ready at once (warm-up goes on in the background); cancelling it stops every kernel."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire_idle)
                if self.config.warmup_on_start:
                    self._wanted.set()
                task_status.started()
                await self._refill_forever()
        finally:
            self._nursery = None
            self._ready.clear()
            self.live.clear()

    async def _refill_forever(self) -> NoReturn:
        last_batch = -float("inf")
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            while (missing := self.config.size - len(self._ready) - self._starting) > 0 and self._free_slots:
                await self._spacing(last_batch + self.config.spacing_s)
                last_batch = trio.current_time()
                count = min(missing, self.config.batch, len(self._free_slots))
                async with trio.open_nursery() as batch:
                    for _ in range(count):
                        batch.start_soon(self._start_ready)

    async def _spacing(self, until: float) -> None:
        """Wait until ``until``, or until the pool is exhausted (then at once, with the exhaustion trigger)."""
        while trio.current_time() < until and (self._ready or not self.config.exhaustion_trigger):
            self._wanted = trio.Event()
            with trio.move_on_at(until):
                await self._wanted.wait()  # set by every take: the pool may be empty now

    async def _start_ready(self) -> None:
        self._starting += 1
        try:
            self._ready.append(await self.start())
        except ServiceUnavailable:  # it did not start (logged), or the zygote is down: the next trigger tries again
            pass
        finally:
            self._starting -= 1

    async def _expire_idle(self) -> NoReturn:
        while True:
            await trio.sleep(max(1.0, min(30.0, self.config.idle_ttl_s / 4)))
            now = time.monotonic()
            for key, kernel in list(self.live.items()):
                if not kernel.alive or now - kernel.last_used > self.config.idle_ttl_s:
                    self.counters["expired"] += 1
                    self._evict(key)

    # --- kernels -------------------------------------------------------------------------------------------

    async def start(self, owner: str = "") -> Kernel:
        """A new kernel on a free slot (evicting the least recently used live kernel when none is free), with
        ``owner``'s package cache when the sandbox network is on.

        Raises:
            KernelStartFailed: it did not come up.
            ServiceUnavailable: every slot is held by a kernel that is running.
        """
        if self._nursery is None:
            raise ServiceUnavailable("Python kernels are not available right now", retry_after_s=2)
        slot = await self._take_slot()
        identity = Identity(self.config.base_uid + 2 + slot, self.config.base_uid + 2 + slot)
        try:
            kernel: Kernel = await self._nursery.start(partial(self._kernel_task, slot, identity, owner))
        except ServiceUnavailable:  # KernelStartFailed, or the zygote is down
            self.counters["start_failures"] += 1
            raise
        self.counters["started"] += 1
        self._running[slot] = kernel
        return kernel

    async def _kernel_task(self, slot: int, identity: Identity, owner: str, *,
                           task_status: trio.TaskStatus[Kernel]) -> None:  # fmt: skip
        try:
            await serve_kernel(self.kernels, slot, identity, self.active, owner, task_status=task_status)
        finally:
            self._running.pop(slot, None)
            self._free_slots.append(slot)
            self._slot_freed.set()  # wakes every task waiting for a slot; later waiters wait on a new event
            self._slot_freed = trio.Event()

    async def _take_slot(self) -> int:
        """A free slot: evicting the least recently used live kernel, or waiting for a stopping one to be gone."""
        deadline = trio.current_time() + SLOT_WAIT_S
        while not self._free_slots:
            stopping = any(kernel.broken for kernel in self._running.values())
            if self.live:
                self._evict(min(self.live, key=lambda key: self.live[key].last_used))
            elif not stopping or trio.current_time() > deadline:
                raise ServiceUnavailable("Every Python kernel is busy; retry shortly", retry_after_s=2)
            freed = self._slot_freed
            with trio.move_on_at(deadline):
                await freed.wait()
        return self._free_slots.pop()

    async def take(self, owner: str = "", *, fresh: bool = False) -> Kernel:
        """A kernel for a session of ``owner`` that has none: a ready one (a hit) or a new one (a miss). ``fresh``:
        a new one, when a ready one just turned out dead (the others may have died with it, unnoticed so far).

        With the sandbox network on there are no ready kernels: each starts with its principal's package cache.
        """
        while self._ready and not fresh:
            kernel = self._ready.pop(0)
            self._wanted.set()
            if kernel.alive:
                self.counters["hits"] += 1
                return kernel
            await kernel.kill()
        self.counters["misses"] += 1
        if self.config.exhaustion_trigger:
            self._wanted.set()
        return await self.start(owner)

    def take_live(self, session: str) -> Kernel | None:
        """The session's live kernel, taken out while it runs (the caller keeps or discards it)."""
        return self.live.pop(session, None)

    def keep(self, session: str, kernel: Kernel) -> None:
        """Bind ``kernel`` to ``session`` until it idles out, within the count and memory limits."""
        if not self.config.keep_live:
            self.discard(kernel)
            return
        self.park(session, kernel)

    def park(self, key: str, kernel: Kernel) -> None:
        """Hold ``kernel`` under ``key`` like a live kernel (evictable, expiring), even with REPL_ENABLED=false:
        a programmatic run paused for tool calls. An evicted paused run continues by replay."""
        if not kernel.alive:
            self.discard(kernel)
            return
        kernel.session = key
        kernel.last_used = time.monotonic()
        self.live[key] = kernel
        while len(self.live) > self.config.max_live:
            self._evict(min(self.live, key=lambda key: self.live[key].last_used))
        while self.live and sum(k.memory_bytes() for k in self.live.values()) > self.config.memory_budget_bytes:
            self._evict(min(self.live, key=lambda key: self.live[key].last_used))

    def discard(self, kernel: Kernel) -> None:
        """Stop a kernel (in the background: its task removes the jail and frees the slot)."""
        kernel.broken = True
        if self._nursery is not None:
            self._nursery.start_soon(kernel.kill)

    def _evict(self, session: str) -> None:
        kernel = self.live.pop(session, None)
        if kernel is not None:
            self.counters["evicted"] += 1
            self.discard(kernel)
