"""Python runs in kernels: a session's live kernel, or a pool kernel restored from its checkpoint.

One run of a session at a time (the session lock, across nodes too). A live kernel is used only
while its generation equals the stored one (DESIGN §4: another node may have run the session
since); otherwise it is dropped and a fresh kernel gets the stored checkpoint. After a successful
run (or any, with STATE_CAPTURE_ON_ERROR) the kernel serialises its variables in the jail; their
warnings go into the reply, and the bytes are stored after the reply, before the lock is released.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from interpreter.execution.executor import Work
from interpreter.execution.kernel_pool import KernelPool
from interpreter.execution.kernels import Kernel, KernelDied
from interpreter.execution.runner import Job, OnOutput, RunResult
from interpreter.execution.state import StateStore
from interpreter.execution.workspace import Workspace
from interpreter.files.catalog import Session

log = logging.getLogger("interpreter.kernels")

LOCK_LEASE_EXTRA_S = 120  # beyond the run's timeout: staging, collecting, checkpointing
NO_SOURCE = ""  # a kernel has no source file in /mnt/data
LOST = "The Python kernel stopped after the run: its variables were not saved."
RESTORE_ATTEMPTS = 2  # see _restored
UNSTARTED_ATTEMPTS = 2  # a kernel found dead when the run began is replaced once


def session_key(session: Session) -> str:
    """The key of a session's live kernel in the pool."""
    return f"{session.owner}:{session.id}"


@dataclass
class PythonOutcome:
    """What a Python run adds to its reply."""

    restored: bool = False
    state_warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PythonRuns:
    pool: KernelPool
    state: StateStore
    persist_state: bool  # STATE_PERSISTENCE_ENABLED
    capture_on_error: bool  # STATE_CAPTURE_ON_ERROR
    state_max_bytes: int

    def work(
        self, job: Job, session: Session, existing: bool, workspace: Workspace, outcome: PythonOutcome
    ) -> Work[RunResult]:
        """The executor work for ``job`` in ``session`` (``existing``: the session is not new)."""

        async def steps(on_output: OnOutput | None) -> AsyncGenerator[RunResult, None]:
            lease = job.timeout_s + LOCK_LEASE_EXTRA_S
            async with self.state.session_lock(session.owner, session.id, lease_s=lease, wait_s=lease):
                for attempt in range(1, UNSTARTED_ATTEMPTS + 1):
                    kernel = await self.staged_kernel(session, existing, workspace, outcome, fresh=attempt > 1)
                    egress_before = kernel.egress()
                    try:
                        result = await kernel.run(job.code, job.args, job.stdin, job.timeout_s, on_output,
                                                  job.stdin_stream)  # fmt: skip
                        result.egress = _difference(kernel.egress(), egress_before)
                        state = await self.conclude(kernel, result, workspace, outcome)
                        break
                    except KernelDied as died:
                        self.pool.discard(kernel)
                        log.info("a kernel died during a run", extra={"fields": {"reason": str(died)}})
                        if died.unstarted and attempt < UNSTARTED_ATTEMPTS and job.stdin_stream is None:
                            continue  # nothing of the run happened: it goes again in another kernel
                        if died.result is None:
                            raise
                        yield died.result
                        return
                    except BaseException:
                        self.pool.discard(kernel)
                        raise
                yield result
                await self.store(session, kernel, state)

        return steps

    async def conclude(self, kernel: Kernel, result: RunResult, workspace: Workspace, outcome: PythonOutcome, *,
                       checkpoint: bool = True) -> bytes | None:  # fmt: skip
        """After a cell: store its files, then take the checkpoint to store after the reply (None: none).

        A kernel that dies while checkpointing is discarded; the reply stands (``outcome`` says so).
        """
        await workspace.collect(kernel.run_dir, NO_SOURCE)
        kernel.present = workspace.present
        if not checkpoint:
            return None
        try:
            return await self._checkpoint(kernel, result, outcome)
        except KernelDied:
            self.pool.discard(kernel)
            outcome.state_warnings.append(LOST)
            return None

    async def store(self, session: Session, kernel: Kernel, state: bytes | None) -> None:
        """After the reply: store the checkpoint (unless the stored one holds the same bytes), keep the kernel."""
        if state is not None and kernel.alive and self._changed(kernel, state):
            kernel.generation = await self.state.save(session.owner, session.id, state)
            kernel.saved = (hashlib.sha256(state).digest(), time.monotonic())
        self.pool.keep(session_key(session), kernel)

    async def staged_kernel(self, session: Session, existing: bool, workspace: Workspace, outcome: PythonOutcome,
                            *, fresh: bool = False) -> Kernel:  # fmt: skip
        """The session's kernel (``kernel_for``) with the run's files in its run directory."""
        key, owner, session_id = session_key(session), session.owner, session.id
        kernel = await self.kernel_for(key, owner, session_id, existing, outcome, fresh=fresh)
        try:
            await workspace.stage(kernel.run_dir, NO_SOURCE, kernel.identity, kernel.present)
        except OSError:  # its jail went away between runs (it died while idle): a fresh kernel
            self.pool.discard(kernel)
            kernel = await self.kernel_for(key, owner, session_id, existing, outcome, fresh=True)
            await workspace.stage(kernel.run_dir, NO_SOURCE, kernel.identity, kernel.present)
        except BaseException:  # the store failed: the kernel is as it was, and stays the session's
            self.pool.keep(key, kernel)
            raise
        return kernel

    async def kernel_for(self, key: str, owner: str, session_id: str, existing: bool, outcome: PythonOutcome, *,
                         fresh: bool = False) -> Kernel:  # fmt: skip
        """The session's live kernel if it is current, else a pool kernel with the session's checkpoint
        (``fresh``: a new kernel, not a ready one; see ``KernelPool.take``)."""
        generation = await self.state.generation(owner, session_id) if existing else 0
        kernel = self.pool.take_live(key)
        if kernel is not None and kernel.alive and kernel.generation == generation:
            return kernel
        if kernel is not None:
            self.pool.discard(kernel)  # out of date: the session ran elsewhere since
        state = await self.state.load(owner, session_id) if existing and self.persist_state else None
        kernel = await self._restored(owner, state, outcome, fresh) if state is not None else None
        if kernel is None:
            kernel = await self.pool.take(owner, fresh=fresh)
        kernel.generation = generation
        return kernel

    async def _restored(self, owner: str, state: bytes, outcome: PythonOutcome, fresh: bool) -> Kernel | None:
        """A pool kernel holding ``state``, or None (with a warning) when restoring it kills the kernel."""
        for attempt in range(RESTORE_ATTEMPTS):
            kernel = await self.pool.take(owner, fresh=fresh or attempt > 0)
            try:
                outcome.state_warnings += await kernel.restore(state)
            except KernelDied:
                # A ready kernel can die unnoticed (killed from outside while idle), so a new kernel gets the
                # state; when that one dies too, it is the restore that kills them (a state needing more
                # memory than the limit, say), and the run goes on without it.
                self.pool.discard(kernel)
                continue
            except BaseException:
                self.pool.discard(kernel)
                raise
            outcome.restored = True
            return kernel
        outcome.state_warnings.append("The saved variables could not be restored; this run starts without them.")
        return None

    def _changed(self, kernel: Kernel, state: bytes) -> bool:
        """False when the stored checkpoint already holds exactly these bytes (and is far from expiring)."""
        if kernel.saved is None:
            return True
        digest, saved_at = kernel.saved
        fresh = time.monotonic() - saved_at < self.state.ttl_s / 4
        return not (fresh and digest == hashlib.sha256(state).digest())

    async def _checkpoint(self, kernel: Kernel, result: RunResult, outcome: PythonOutcome) -> bytes | None:
        if not self.persist_state or (result.status != "ok" and not self.capture_on_error):
            return None
        state, warnings = await kernel.checkpoint(self.state_max_bytes)
        outcome.state_warnings += warnings
        return state


def _difference(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int] | None:
    """What a kernel did through the egress proxy during one run."""
    if after is None or before is None:
        return None
    return {key: value - before.get(key, 0) for key, value in after.items()}
