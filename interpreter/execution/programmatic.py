"""Programmatic tool calling: runs that pause for the agent's tools and continue on any node.

A run starts like a Python run (the session lock, the session's kernel or a pool kernel with its
checkpoint, the run's files), but its cell has tools (``kernels.Cell``). When the code calls
tools the run **pauses**: the reply carries the calls and a continuation token, the run slot is
given back, the kernel is parked in the pool (evictable like a live kernel) and the session lock
stays held as a lease. Everything needed to go on is in the token's record in KV:

    ptc:<p>:<sha256(token)>     the run: code, tools, files, the state generation it started from,
                                its rounds (calls, and the results of all but the last), the node
                                holding it and its lock token. TTL PTC_TOKEN_TTL_SECONDS; taken
                                atomically, so a token continues a run once, on one node.
    ptcreq:<p>:<sha256(id)>     the run a client request id (X-LibreChat-Code-Request-ID) names
    ptccancel:<p>:<run>         set by a cancel

A continuation that reaches the node holding the parked kernel resumes it. Anywhere else (another
node, after a restart, after the kernel was evicted) the run is **replayed**: a fresh kernel gets
the checkpoint the run started from (pinned at its first pause), the code runs again from the
start, and each recorded round is answered from the record, as long as the code asks for exactly
the recorded calls; then it goes on live. So code before the last tool call runs again on a replay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NoReturn

import trio

from interpreter.execution.executor import Work
from interpreter.execution.kernel_pool import KernelPool
from interpreter.execution.kernels import Cell, Kernel, KernelDied, ToolCalls
from interpreter.execution.python import NO_SOURCE, PythonOutcome, PythonRuns
from interpreter.execution.runner import OnOutput, RunResult
from interpreter.execution.state import Lease
from interpreter.execution.workspace import FileLimits, Ref, Workspace, plan_workspace
from interpreter.files.catalog import Catalog, Session
from interpreter.stores.protocols import KV, StoreError

log = logging.getLogger("interpreter.ptc")

LEASE_EXTRA_S = 120  # beyond a round's budget or a pause: staging, collecting, checkpointing
TOKEN_GRACE_S = 5  # a paused run's lease outlives its token by this much
SWEEP_EVERY_S = 2.0
MAX_CALLS_PER_ROUND = 100
Status = Literal["tool_call_required", "completed", "error"]


@dataclass(frozen=True)
class Tool:
    name: str  # as the client named it (the calls carry it back)
    bind: str  # the name the code calls it by
    description: str = ""


@dataclass
class Reply:
    """One answer of a programmatic run."""

    status: Status
    session_id: str | None
    token: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    result: RunResult | None = None
    error: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for stderr: workspace and state warnings
    lang: str = "py"


def failed(message: str, session_id: str | None = None) -> Reply:
    return Reply("error", session_id, error=message)


INVALID_TOKEN = "Invalid or expired continuation token"


@dataclass
class Record:
    """A paused run, as stored under its token (JSON)."""

    run: str
    node: str
    owner: str
    session: str
    lang: str
    code: str
    tools: list[dict[str, str]]
    timeout_s: float
    remaining_s: float
    refs: list[dict[str, str]]
    generation: int
    lock: str  # hex of the session lease's token
    rounds: list[dict[str, Any]]  # {"calls": [{"id", "name", "input"}], "results": [...] | None}
    persisted: bool  # the run's starting checkpoint was pinned

    def dump(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def load(cls, raw: bytes) -> Record:
        return cls(**json.loads(raw))


@dataclass
class Paused:
    """A run paused on this node: its cell waits in a parked kernel."""

    record: Record
    cell: Cell
    lease: Lease
    workspace: Workspace
    session: Session
    outcome: PythonOutcome
    token_key: str
    expires: float
    claiming: bool = False


@dataclass(frozen=True)
class Program:
    """A new run, as the route validated it."""

    lang: str
    code: str
    tools: list[Tool]
    timeout_s: float
    refs: list[Ref]
    request_id: str | None = None


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Programmatic:
    def __init__(self, python: PythonRuns, catalog: Catalog, kv: KV, limits: FileLimits, *, token_ttl_s: float,
                 max_rounds: int) -> None:  # fmt: skip
        self.python, self.catalog, self.kv, self.limits = python, catalog, kv, limits
        self.token_ttl_s, self.max_rounds = token_ttl_s, max_rounds
        self.node = secrets.token_hex(8)
        self.paused: dict[str, Paused] = {}  # by run id
        self.executing: dict[str, trio.CancelScope] = {}  # by run id: rounds running on this node
        self.counters = {"started": 0, "paused": 0, "resumed": 0, "replayed": 0, "completed": 0, "failed": 0}

    @property
    def pool(self) -> KernelPool:
        return self.python.pool

    def statistics(self) -> dict[str, int]:
        return {"paused_here": len(self.paused), "executing_here": len(self.executing), **self.counters}

    # --- the service: paused runs expire, or were continued elsewhere ---------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Ready at once. At shutdown paused runs are left as they are in the stores (their kernels stop with
        the pool): after a restart, or on another node, they continue by replay."""
        task_status.started()
        while True:
            await trio.sleep(SWEEP_EVERY_S)
            await self.sweep()

    async def sweep(self) -> None:
        now = time.monotonic()
        for run_id, paused in list(self.paused.items()):
            if paused.claiming:
                continue
            try:
                gone = now > paused.expires or await self.kv.get(paused.token_key) is None
            except StoreError:
                gone = now > paused.expires
            if gone and self.paused.get(run_id) is paused and not paused.claiming:
                await self._drop(run_id)

    async def _drop(self, run_id: str) -> None:
        """Forget a paused run here: its kernel goes and this node's lease is released. Its pinned checkpoint
        stays (until its TTL): another node may be replaying the run from it right now."""
        paused = self.paused.pop(run_id, None)
        if paused is None:
            return
        kernel = self.pool.take_live(_park_key(paused.record))
        if kernel is not None:
            self.pool.discard(kernel)
        with trio.CancelScope(shield=True):
            await self.python.state.release(paused.lease)

    async def _release(self, record: Record, lease: Lease | None) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if lease is not None:
                await self.python.state.release(lease)
            try:
                await self.python.state.unpin(record.owner, record.run)
            except StoreError:
                log.warning("a paused run's checkpoint copy could not be removed (it expires)")

    # --- starting, continuing, cancelling -------------------------------------------------------------

    def start(self, program: Program, session: Session, existing: bool, workspace: Workspace,
              outcome: PythonOutcome) -> Work[Reply]:  # fmt: skip
        """The executor work of a new run."""
        tools = [asdict(tool) for tool in program.tools]
        record = Record(
            run=secrets.token_hex(12), node=self.node, owner=session.owner, session=session.id, lang=program.lang,
            code=program.code, tools=tools, timeout_s=program.timeout_s, remaining_s=program.timeout_s,
            refs=[asdict(ref) for ref in program.refs], generation=0, lock="", rounds=[], persisted=False,
        )  # fmt: skip

        async def steps(on_output: OnOutput | None) -> AsyncGenerator[Reply, None]:
            self.counters["started"] += 1
            await self._name(record, program.request_id)
            lease_s = program.timeout_s + LEASE_EXTRA_S
            lease = await self.python.state.acquire(session.owner, session.id, lease_s=lease_s, wait_s=lease_s)
            try:
                record.lock = lease.token.hex()
                kernel = await self.python.staged_kernel(session, existing, workspace, outcome)
                record.generation = kernel.generation
                cell = Cell(kernel, program.timeout_s, None, tools)
            except BaseException:
                await self._release(record, lease)
                raise
            async for reply in self._go(record, session, workspace, outcome, kernel, cell, lease,
                                        lambda: cell.start(program.code, lang=program.lang)):  # fmt: skip
                yield reply

        return steps

    def resume(self, owner: str, token: str, results: list[dict[str, Any]], request_id: str | None) -> Work[Reply]:
        """The executor work of a continuation (``results``: the client's ``tool_results``)."""

        async def steps(on_output: OnOutput | None) -> AsyncGenerator[Reply, None]:
            record = await self._claim(owner, token)
            if record is None:
                yield failed(INVALID_TOKEN)
                return
            await self._name(record, request_id)
            answers = _answers(record.rounds[-1]["calls"], results)
            paused = self.paused.pop(record.run, None) if record.node == self.node else None
            if await self.kv.get(f"ptccancel:{record.owner}:{record.run}") is not None:
                if paused is not None:
                    self.paused[record.run] = paused
                    await self._drop(record.run)
                yield failed("The run was cancelled", record.session)
                return
            kernel = self.pool.take_live(_park_key(record)) if paused is not None else None
            if paused is not None and kernel is paused.cell.kernel and kernel is not None and kernel.alive:
                self.counters["resumed"] += 1
                await self.python.state.extend(paused.lease, record.remaining_s + LEASE_EXTRA_S)
                cell = paused.cell
                async for reply in self._go(record, paused.session, paused.workspace, paused.outcome, kernel,
                                            cell, paused.lease, lambda: cell.resume(answers)):  # fmt: skip
                    yield reply
                return
            if kernel is not None:
                self.pool.discard(kernel)
            async for reply in self._replay(record, answers, paused.lease if paused is not None else None):
                yield reply

        return steps

    async def _claim(self, owner: str, token: str) -> Record | None:
        """The run a continuation token names, taken (single use); None when it is unknown, used or expired."""
        key = f"ptc:{owner}:{_hash(token)}"
        local = next((paused for paused in self.paused.values() if paused.token_key == key), None)
        if local is not None:
            local.claiming = True  # the sweeper must not drop it meanwhile
        try:
            raw = await self.kv.take(key)
        finally:
            if local is not None:
                local.claiming = False
        try:
            return Record.load(raw) if raw is not None else None
        except (ValueError, TypeError):
            return None

    async def _name(self, record: Record, request_id: str | None) -> None:
        """Let ``request_id`` (the client's X-LibreChat-Code-Request-ID) name the run for a cancel."""
        if request_id:
            await self.kv.set(f"ptcreq:{record.owner}:{_hash(request_id)}", record.run.encode(),
                              ttl_s=self.token_ttl_s + record.timeout_s)  # fmt: skip

    @contextlib.contextmanager
    def _cancellable(self, record: Record) -> Iterator[trio.CancelScope]:
        """Where a cancel of the run stops it (check ``cancelled_caught`` after)."""
        with trio.CancelScope() as scope:
            self.executing[record.run] = scope
            try:
                yield scope
            finally:
                self.executing.pop(record.run, None)

    async def cancel(self, owner: str, request_id: str) -> bool:
        """Stop the run a client request id names, wherever it is; False when there is none."""
        raw = await self.kv.get(f"ptcreq:{owner}:{_hash(request_id)}")
        if raw is None:
            return False
        run_id = raw.decode()
        await self.kv.set(f"ptccancel:{owner}:{run_id}", b"1", ttl_s=self.token_ttl_s * 2)
        scope = self.executing.get(run_id)
        if scope is not None:
            scope.cancel()
        if run_id in self.paused and self.paused[run_id].record.owner == owner:
            await self._drop(run_id)
        return True

    # --- one round ------------------------------------------------------------------------------------

    async def _go(self, record: Record, session: Session, workspace: Workspace, outcome: PythonOutcome,
                  kernel: Kernel, cell: Cell,
                  lease: Lease, advance: Callable[[], Awaitable[RunResult | ToolCalls]],
                  ) -> AsyncGenerator[Reply, None]:  # fmt: skip
        """Advance the cell to its next pause (park it) or its end (conclude it), and reply."""
        ended = True
        try:
            step: RunResult | ToolCalls | None = None
            with self._cancellable(record) as scope:
                try:
                    step = await advance()
                except KernelDied as died:
                    self.pool.discard(kernel)
                    if died.result is None:
                        raise
                    step = died.result
            if scope.cancelled_caught or step is None:
                self.pool.discard(kernel)
                yield failed("The run was cancelled", session.id)
                return
            if isinstance(step, ToolCalls):
                reply = await self._pause(record, session, workspace, outcome, cell, lease, step)
                ended = reply.status != "tool_call_required"
                if ended:
                    self.pool.discard(kernel)
                yield reply
                return
            state = None
            if kernel.alive:
                state = await self.python.conclude(kernel, step, workspace, outcome, checkpoint=record.lang == "py")
            yield self._completed(record, session, workspace, outcome, cell, step)
            if kernel.alive:
                await self.python.store(session, kernel, state)
        except BaseException:
            self.pool.discard(kernel)
            raise
        finally:
            if ended:
                await self._release(record, lease)

    async def _pause(self, record: Record, session: Session, workspace: Workspace, outcome: PythonOutcome,
                     cell: Cell, lease: Lease, step: ToolCalls) -> Reply:  # fmt: skip
        if len(record.rounds) >= self.max_rounds:
            self.counters["failed"] += 1
            return failed(f"Maximum round trips ({self.max_rounds}) exceeded", session.id)
        if len(step.calls) > MAX_CALLS_PER_ROUND:
            self.counters["failed"] += 1
            return failed(f"Too many tool calls at once ({len(step.calls)}; at most {MAX_CALLS_PER_ROUND})", session.id)
        if await self.kv.get(f"ptccancel:{record.owner}:{record.run}") is not None:
            return failed("The run was cancelled", session.id)
        if record.rounds:
            record.rounds[-1]["results"] = cell.last_answers
        calls = [{"id": secrets.token_hex(6), "name": call["name"], "input": call["input"]} for call in step.calls]
        record.rounds.append({"calls": calls, "results": None})
        record.remaining_s, record.node = cell.remaining_s, self.node
        # The lease ends with the token (a continuation extends it at once); the pinned checkpoint lasts a
        # little longer, for a replay that claimed the token just before it expired.
        pin_s = self.token_ttl_s + LEASE_EXTRA_S
        if not record.persisted and self.python.persist_state and record.generation > 0:
            await self.python.state.pin(record.owner, record.session, record.run, pin_s)
            record.persisted = True
        elif record.persisted:
            await self.python.state.extend_pin(record.owner, record.run, pin_s)
        await self.python.state.extend(lease, self.token_ttl_s + TOKEN_GRACE_S)
        token = secrets.token_urlsafe(32)
        token_key = f"ptc:{record.owner}:{_hash(token)}"
        await self.kv.set(token_key, record.dump(), ttl_s=self.token_ttl_s)
        self.pool.park(_park_key(record), cell.kernel)
        self.paused[record.run] = Paused(record, cell, lease, workspace, session, outcome, token_key,
                                         time.monotonic() + self.token_ttl_s)  # fmt: skip
        self.counters["paused"] += 1
        return Reply("tool_call_required", session.id, token=token, calls=calls, lang=record.lang)

    def _completed(self, record: Record, session: Session, workspace: Workspace, outcome: PythonOutcome,
                   cell: Cell, result: RunResult) -> Reply:  # fmt: skip
        notes = [*result.notes, *workspace.notes, *outcome.state_warnings]
        status: Status = "completed" if result.status == "ok" else "error"
        self.counters["completed" if status == "completed" else "failed"] += 1
        error = None
        if status == "error":
            error = (
                {
                    "timeout": f"Execution timed out after {record.timeout_s:g} seconds",
                    "memory_limit": "The program exceeded the memory limit",
                    "output_limit": "The program's output exceeded the limit",
                }.get(result.status)
                or cell.error
                or (result.notes[0] if result.notes else f"exit code {result.exit_code}")
            )
        return Reply(status, session.id, result=result, error=error, files=workspace.files, notes=notes,
                     lang=record.lang)  # fmt: skip

    # --- replay ---------------------------------------------------------------------------------------

    @staticmethod
    async def _bring_back(record: Record, cell: Cell) -> int | None:
        """Run the code again up to its last recorded pause, answering the earlier ones from the record.

        Returns the number of the first round whose calls differ from the record (None: all agree).
        Raises KernelDied if the kernel does not make it.
        """
        step = await cell.start(record.code, lang=record.lang)
        for number, recorded in enumerate(record.rounds, start=1):
            wanted = [{"name": call["name"], "input": call["input"]} for call in recorded["calls"]]
            if not isinstance(step, ToolCalls) or step.calls != wanted:
                return number
            if number < len(record.rounds):
                step = await cell.resume(recorded["results"])
        return None

    async def _replay(self, record: Record, answers: list[dict[str, Any]],
                      lease: Lease | None) -> AsyncGenerator[Reply, None]:  # fmt: skip
        """Bring the run back to its last pause in a fresh kernel, then answer that pause live."""
        self.counters["replayed"] += 1
        state = self.python.state
        session = await self.catalog.session(record.owner, record.session)
        if session is None:
            await self._release(record, lease)
            yield failed("The run's session has expired", record.session)
            return
        if lease is None:
            await state.break_lease(record.owner, record.session, bytes.fromhex(record.lock))
            lease_s = record.timeout_s + LEASE_EXTRA_S
            lease = await state.acquire(record.owner, record.session, lease_s=lease_s, wait_s=lease_s)
        record.lock = lease.token.hex()
        outcome = PythonOutcome()
        kernel: Kernel | None = None
        try:
            refs = [Ref(**ref) for ref in record.refs]
            workspace = await plan_workspace(self.catalog, session, refs, self.limits)
            kernel = await self.pool.take(record.owner)
            kernel.generation = record.generation
            if record.persisted and (base := await state.pinned(record.owner, record.run)) is not None:
                outcome.state_warnings += await kernel.restore(base)
                outcome.restored = True
            await workspace.stage(kernel.run_dir, NO_SOURCE, kernel.identity, kernel.present)
            cell = Cell(kernel, record.timeout_s, None, record.tools)
            problem = None
            with self._cancellable(record) as scope:
                try:
                    mismatch = await self._bring_back(record, cell)
                except KernelDied as died:
                    problem = f"the code stopped before reaching its last tool call ({died})"
                else:
                    if mismatch is not None:
                        problem = f"the code asked for different tool calls than were recorded (round {mismatch})"
            cell.remaining_s = record.remaining_s  # the replay's own time is not the run's
        except BaseException:
            if kernel is not None:
                self.pool.discard(kernel)
            await self._release(record, lease)
            raise
        if scope.cancelled_caught or problem is not None:
            self.pool.discard(kernel)
            await self._release(record, lease)
            self.counters["failed"] += 1
            message = "The run was cancelled" if scope.cancelled_caught else f"The run could not be replayed: {problem}"
            yield failed(message, record.session)
            return
        # Recorded call ids stay valid: the last round is answered live, with the client's results.
        async for reply in self._go(record, session, workspace, outcome, kernel, cell, lease,
                                    lambda: cell.resume(answers)):  # fmt: skip
            yield reply


def _park_key(record: Record) -> str:
    return f"ptc:{record.owner}:{record.run}"


def _answers(calls: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The client's results in the order of the calls (``{"ok", "value", "error"}`` each, as the kernel wants)."""
    by_id = {str(result.get("call_id")): result for result in results}
    answers = []
    for call in calls:
        result = by_id.get(call["id"])
        if result is None:
            answers.append({"ok": False, "value": None, "error": f"No result was given for tool call {call['id']}"})
        elif result.get("is_error"):
            answers.append({"ok": False, "value": None, "error": result.get("error_message") or "Tool call failed"})
        else:
            answers.append({"ok": True, "value": result.get("result"), "error": None})
    return answers
