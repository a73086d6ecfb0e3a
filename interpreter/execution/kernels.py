"""Python kernels seen from the host: start one in a jail, run code in it, checkpoint and restore it.

A kernel is a ``sandboxes/kernel`` process in an nsjail jail of its own (its own uid from the
SANDBOX_UID range, run directory and cgroup), talking the framed protocol over a socketpair. The
host trusts nothing it says: frames are size-checked, output is capped as it arrives, and any
protocol error, EOF or overrun ends the kernel (``KernelDied``). Timeouts are the host's: at the
deadline it sends an interrupt, and a kernel that has not answered a moment later is killed.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from interpreter.egress.proxy import Tap
from interpreter.egress.service import SandboxNetwork
from interpreter.errors import ServiceUnavailable
from interpreter.execution.launcher import (
    Launch,
    LauncherConfig,
    discard,
    drain_tail,
    make_run_paths,
    prepare,
    release_paths,
)
from interpreter.execution.runner import OnOutput, RunResult, Status
from interpreter.execution.zygote import ForkedJail, ForkedProcess, Zygote, ZygoteUnavailable
from sandboxes.host import RunCgroup, memory_usage, oom_kills
from sandboxes.jail import Identity, Limits, RunPaths, build_kernel_argv
from sandboxes.kernel import protocol
from sandboxes.languages import LanguageSpec

log = logging.getLogger("interpreter.kernels")

INTERRUPT_GRACE_S = 1.0
MARKER_WAIT_S = 2.0  # after a result, for the output written before it to arrive
EVENT_BUFFER = 64
FRAME_MAX = 1024 * 1024  # output and control frames; a state frame may be larger (its own cap)
CLEANUP_S = 5


class KernelDied(Exception):
    """The kernel ended, broke the protocol or had to be killed; its live state is gone.

    ``result`` is what the run it was in produced until then (its output, a status and a note).
    ``unstarted``: it died before the run's code began (killed while idle, unnoticed): the run may go again.
    """

    def __init__(self, reason: str, result: RunResult | None = None, *, unstarted: bool = False) -> None:
        super().__init__(reason)
        self.result, self.unstarted = result, unstarted


class KernelStartFailed(ServiceUnavailable):
    message = "A Python kernel could not be started"


@dataclass(frozen=True)
class KernelConfig:
    launcher: LauncherConfig
    paths: RunPaths  # run_dir and log_fd are per kernel; the rest is shared
    python: LanguageSpec
    kernel_dir: Path
    limits: Limits  # wall_s unused: each run has its own deadline
    output_cap_bytes: int
    start_timeout_s: float
    state_max_bytes: int
    zygote: Zygote | None = None  # KERNEL_MODE=zygote (or auto where supported)
    zygote_fallback: bool = False  # KERNEL_MODE=auto: a fresh nsjail while the zygote is down
    egress: SandboxNetwork | None = None  # ENABLE_SANDBOX_NETWORK: kernels start for one principal's cache


Event = tuple[str, Any, Any]  # ("frame", (kind, header), payload) | ("out", stream, bytes) | ("closed", stream, None)
#                             | ("dead", reason, None)


class _Marker:
    """Splits one output stream at the run's end marker; bytes after it are not the run's."""

    def __init__(self, marker: bytes) -> None:
        self.marker, self.pending, self.found = marker, b"", False

    def feed(self, chunk: bytes) -> bytes:
        if self.found:
            return b""
        data, self.pending = self.pending + chunk, b""
        if (at := data.find(self.marker)) >= 0:
            self.found = True
            return data[:at]
        # Hold back only a tail that could be the marker's start (so a flushed line is never held up long).
        keep = next(
            (n for n in range(min(len(self.marker) - 1, len(data)), 0, -1) if self.marker.startswith(data[-n:])), 0
        )
        self.pending = data[len(data) - keep :]
        return data[: len(data) - keep]

    def rest(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


@dataclass
class Kernel:
    launch: Launch | ForkedJail
    stream: trio.SocketStream
    events: trio.MemoryReceiveChannel[Event]
    slot: int
    identity: Identity
    output_cap: int
    memory_limit: int
    started_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    session: str | None = None  # the session (or paused programmatic run of it) it is held for
    generation: int = 0  # the checkpoint its state equals
    present: dict[str, Any] = field(default_factory=dict)  # what its run directory holds (workspace.py)
    saved: tuple[bytes, float] | None = None  # digest and time of the checkpoint it last stored
    broken: bool = False
    log_tail: bytearray = field(default_factory=bytearray)

    @property
    def run_dir(self) -> Path:
        return self.launch.run_dir

    @property
    def alive(self) -> bool:
        return not self.broken and self.launch.process.returncode is None

    @property
    def cgroup(self) -> RunCgroup | None:
        return self.launch.cgroup

    def memory_bytes(self) -> int:
        return memory_usage(self.launch.cgroup) if self.launch.cgroup is not None else 0

    def egress(self) -> dict[str, int] | None:
        """What it did through the egress proxy so far (None: no sandbox network)."""
        return self.launch.tap.figures() if self.launch.tap is not None else None

    async def send(self, kind: int, header: dict[str, Any] | None = None, payload: bytes = b"") -> None:
        try:
            await self.stream.send_all(protocol.encode(kind, header, payload))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            raise KernelDied("the kernel stopped reading") from None

    async def reply(self, wanted: int) -> tuple[dict[str, Any], bytes]:
        """The next frame of kind ``wanted``; output in between (background threads) is not any run's."""
        while True:
            try:
                event, first, second = await self.events.receive()
            except trio.EndOfChannel:
                event, first, second = "dead", "the kernel ended", None
            if event == "dead":
                self.broken = True
                raise KernelDied(first)
            if event == "frame" and first[0] == wanted:
                return first[1], second

    # --- requests ----------------------------------------------------------------------------------------

    async def run(self, code: str, args: tuple[str, ...], stdin: bytes | None, timeout_s: float,
                  on_output: OnOutput | None,
                  stdin_stream: trio.MemoryReceiveChannel[bytes | None] | None = None) -> RunResult:  # fmt: skip
        """One cell (without tools, so it never pauses); see ``Cell``."""
        outcome = await Cell(self, timeout_s, on_output).start(code, args, stdin, stdin_stream)
        assert isinstance(outcome, RunResult)
        return outcome

    async def interrupt(self) -> None:
        with contextlib.suppress(KernelDied):
            await self.send(protocol.INTERRUPT)

    async def checkpoint(self, max_bytes: int) -> tuple[bytes | None, list[str]]:
        """(opaque state, warnings). None when the state is over ``max_bytes`` (a warning says so), or when
        there are no variables and no checkpoint yet (a restore would give just that: nothing to store)."""
        await self.send(protocol.CHECKPOINT, {"max_bytes": max_bytes})
        header, payload = await self.reply(protocol.STATE)
        nothing_new = header.get("variables") == 0 and self.generation == 0
        return (payload if header.get("saved") and not nothing_new else None), _warnings(header)

    async def restore(self, state: bytes) -> list[str]:
        await self.send(protocol.RESTORE, None, state)
        header, _ = await self.reply(protocol.RESULT)
        return _warnings(header)

    async def kill(self) -> None:
        self.broken = True
        process = self.launch.process
        if process.returncode is None:
            process.terminate()  # nsjail kills the jailed tree
            with trio.move_on_after(INTERRUPT_GRACE_S):
                await process.wait()
            if process.returncode is None:
                process.kill()


@dataclass(frozen=True)
class ToolCalls:
    """A cell paused for tool calls: ``[{"name", "input"}]`` as the kernel asked, names among its tools."""

    calls: list[dict[str, Any]]


class Cell:
    """One run in a kernel. With tools it may pause for tool calls between rounds (programmatic tool calling).

    Output is capped per stream as it arrives, across rounds. ``timeout_s`` is a budget of time
    spent executing, summed over the rounds: a pause (the client calling its tools) does not count.
    Over the cap or the budget the cell is interrupted, and the kernel is killed if it does not stop
    (``KernelDied``, carrying what the cell printed).
    """

    def __init__(self, kernel: Kernel, timeout_s: float, on_output: OnOutput | None,
                 tools: list[dict[str, str]] | None = None) -> None:  # fmt: skip
        self.kernel, self.timeout_s, self.on_output, self.tools = kernel, timeout_s, on_output, tools
        self.remaining_s = timeout_s
        self.marker = secrets.token_hex(16)
        self.streams = {name: _Marker(self.marker.encode()) for name in ("stdout", "stderr")}
        self.captured = {name: bytearray() for name in self.streams}
        self.interrupted: Status | None = None
        self.error: str | None = None  # the kernel's one-line summary of a failure (untrusted text)
        self.last_answers: list[dict[str, Any]] = []  # what the last pause was answered with
        self.started = False  # the kernel said the code began (user code can only kill it after that)
        self.oom_before = oom_kills(kernel.cgroup) if kernel.cgroup is not None else 0

    async def start(self, code: str, args: tuple[str, ...] = (), stdin: bytes | None = None,
                    stdin_stream: trio.MemoryReceiveChannel[bytes | None] | None = None,
                    lang: str = "py") -> RunResult | ToolCalls:  # fmt: skip
        # The stdin given up front rides with the run; what streams in follows as STDIN frames.
        header = {"code": code, "args": list(args), "marker": self.marker, "stdin_eof": stdin_stream is None,
                  "lang": lang, "tools": self.tools or []}  # fmt: skip
        try:
            await self.kernel.send(protocol.RUN, header, stdin or b"")
        except KernelDied as died:  # it died while idle, between being taken and this run
            raise KernelDied(str(died), self._died(), unstarted=True) from None
        return await self._advance(stdin_stream)

    async def resume(self, results: list[dict[str, Any]]) -> RunResult | ToolCalls:
        """Answer the calls of the last pause (``{"ok", "value", "error"}`` each, in their order)."""
        self.last_answers = results
        try:
            await self.kernel.send(protocol.TOOL_RESULT, {"results": results})
        except KernelDied as died:
            raise KernelDied(str(died), self._died()) from None
        return await self._advance(None)

    async def _keep(self, name: str, data: bytes) -> None:
        room = max(0, self.kernel.output_cap - len(self.captured[name]))
        kept = data[:room]
        self.captured[name] += kept
        if kept and self.on_output is not None:
            await self.on_output(name, kept)
        if len(kept) < len(data) and self.interrupted is None:
            self.interrupted = "output_limit"
            await self.kernel.interrupt()

    def _tool_calls(self, header: dict[str, Any]) -> ToolCalls | None:
        """The calls of a TOOL_CALL frame, if this cell has tools and the frame is well formed."""
        calls, names = header.get("calls"), {tool["name"] for tool in self.tools or ()}
        if not names or self.interrupted is not None or not isinstance(calls, list) or not calls:
            return None
        if not all(isinstance(call, dict) and call.get("name") in names for call in calls):
            return None
        return ToolCalls([{"name": call["name"], "input": call.get("input")} for call in calls])

    async def _advance(self, stdin_stream: trio.MemoryReceiveChannel[bytes | None] | None) -> RunResult | ToolCalls:
        """Run until the cell ends (its RunResult) or pauses for tool calls."""
        kernel = self.kernel
        kernel.last_used = began = time.monotonic()
        deadline = trio.current_time() + max(0.0, self.remaining_s)
        result: dict[str, Any] | None = None
        dead: str | None = None
        closed: set[str] = set()
        try:
            async with trio.open_nursery() as feeder:
                if stdin_stream is not None:
                    feeder.start_soon(self._forward_stdin, stdin_stream)
                while True:
                    with trio.move_on_at(deadline):
                        try:
                            event, first, second = await kernel.events.receive()
                        except trio.EndOfChannel:  # the jail is gone and its pipes were read to the end
                            dead = dead or "the kernel ended"
                            break
                        if event == "out":
                            was = self.interrupted
                            await self._keep(first, self.streams[first].feed(second))
                            if self.interrupted is not None and was is None:
                                deadline = trio.current_time() + INTERRUPT_GRACE_S
                        elif event == "closed":
                            closed.add(first)
                        elif event == "dead":
                            dead, deadline = first, trio.current_time() + INTERRUPT_GRACE_S  # the pipes' last bytes
                        elif event == "frame" and first[0] == protocol.STARTED:
                            self.started = True
                        elif event == "frame" and first[0] == protocol.RESULT:
                            result, deadline = first[1], trio.current_time() + MARKER_WAIT_S
                        elif event == "frame" and first[0] == protocol.TOOL_CALL and dead is None and result is None:
                            calls = self._tool_calls(first[1])
                            if calls is not None:
                                feeder.cancel_scope.cancel()
                                return calls
                        if (result is not None and all(s.found for s in self.streams.values())) or len(closed) == 2:
                            break
                        continue
                    if result is not None or dead is not None:
                        break  # the markers (or the pipes' ends) did not come in time: what arrived is all
                    if self.interrupted is not None:  # interrupted, and still going: it goes
                        await kernel.kill()
                        dead = f"the run ignored its {self.interrupted}"
                        deadline = trio.current_time() + INTERRUPT_GRACE_S
                        continue
                    self.interrupted = "timeout"
                    await kernel.interrupt()
                    deadline = trio.current_time() + INTERRUPT_GRACE_S
                feeder.cancel_scope.cancel()
        except* KernelDied as group:  # the kernel stopped reading: it is gone
            dead = str(group.exceptions[0])
        finally:
            kernel.last_used = time.monotonic()
            self.remaining_s -= kernel.last_used - began
        for name, scanner in self.streams.items():
            if not scanner.found:
                await self._keep(name, scanner.rest())
        if dead is not None or result is None:
            kernel.broken = True
            # Output may have come (the jail's shell reports the kill), but none of the run's code ran.
            unstarted = not self.started and self.interrupted is None
            raise KernelDied(dead or "no result", self._died(), unstarted=unstarted)
        return self._result(result)

    def _result(self, result: dict[str, Any]) -> RunResult:
        exit_code = result.get("exit_code") if isinstance(result.get("exit_code"), int) else 1
        self.error = str(result["error"])[:1000] if result.get("error") else None
        status: Status = self.interrupted or ("ok" if exit_code == 0 else "error")
        notes = []
        cgroup, limit = self.kernel.cgroup, self.kernel.memory_limit
        if cgroup is not None and oom_kills(cgroup) > self.oom_before:
            # A process of the run was killed for memory (a child, say); the kernel itself survived.
            status = "memory_limit"
            notes.append(f"A process was killed: the run exceeded the memory limit of {limit >> 20} MiB.")
        elif self.interrupted == "timeout":
            notes.append(f"Execution timed out after {self.timeout_s:g} s.")
        elif self.interrupted == "output_limit":
            notes.append(f"Output exceeded the limit of {self.kernel.output_cap} bytes per stream; "
                         "the program was stopped.")  # fmt: skip
        return RunResult(
            status=status, exit_code=exit_code, stdout=bytes(self.captured["stdout"]),
            stderr=bytes(self.captured["stderr"]), truncated=self.interrupted == "output_limit",
            duration_ms=self.executed_ms, notes=notes,
        )  # fmt: skip

    @property
    def executed_ms(self) -> int:
        """Time spent executing so far, over every round."""
        return int((self.timeout_s - self.remaining_s) * 1000)

    async def _forward_stdin(self, chunks: trio.MemoryReceiveChannel[bytes | None]) -> None:
        """Stdin that streams in during the run, as STDIN frames; None is its end. A kernel that stopped
        reading is the run loop's to notice."""
        with contextlib.suppress(KernelDied):
            async for chunk in chunks:
                if chunk is None:
                    await self.kernel.send(protocol.STDIN_EOF)
                    return
                await self.kernel.send(protocol.STDIN, None, chunk)

    def _died(self) -> RunResult:
        status: Status = self.interrupted or "error"
        note = "The Python kernel stopped during the run; variables since the last saved state are lost."
        cgroup, limit = self.kernel.cgroup, self.kernel.memory_limit
        if cgroup is not None and oom_kills(cgroup) > self.oom_before:
            status = "memory_limit"
            note = (f"The program was killed: it exceeded the memory limit of {limit >> 20} MiB; "
                    "variables since the last saved state are lost.")  # fmt: skip
        elif self.interrupted == "timeout":
            note = f"Execution timed out after {self.timeout_s:g} s; the kernel had to be stopped."
        return RunResult(
            status=status, exit_code=None, stdout=bytes(self.captured["stdout"]),
            stderr=bytes(self.captured["stderr"]), truncated=self.interrupted == "output_limit",
            duration_ms=self.executed_ms, notes=[note],
        )  # fmt: skip


def _warnings(header: dict[str, Any]) -> list[str]:
    """The kernel's warnings, bounded (they come from the user's process)."""
    warnings = header.get("warnings")
    return [str(w)[:300] for w in warnings[:100]] if isinstance(warnings, list) else []


async def serve_kernel(config: KernelConfig, slot: int, identity: Identity, active: set[Path], owner: str = "", *,
                       task_status: trio.TaskStatus[Kernel] = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Start a kernel and keep its jail's pipes drained for as long as it lives (a task per kernel).

    The kernel is forked by the zygote (KERNEL_MODE=zygote; with ``auto``, a fresh nsjail when the zygote
    is down) or started in a fresh nsjail. ``started()`` carries the Kernel once it is ready. When it
    ends, everything of the jail is removed. With the sandbox network on, it has ``owner``'s package cache.

    Raises:
        KernelStartFailed: the jail or the kernel did not come up within REPL_WARMUP_TIMEOUT_SECONDS.
    """
    send_events, events = trio.open_memory_channel[Event](EVENT_BUFFER)
    async with _jail(config, slot, identity, active, owner) as (jail, stream, log_pipe, start):
        kernel = Kernel(jail, stream, events, slot, identity, config.output_cap_bytes, config.limits.memory_bytes)
        async with trio.open_nursery() as nursery:
            if log_pipe is not None:
                nursery.start_soon(drain_tail, log_pipe, kernel.log_tail)
            assert jail.process.stdout is not None
            assert jail.process.stderr is not None
            for name, pipe in (("stdout", jail.process.stdout), ("stderr", jail.process.stderr)):
                nursery.start_soon(_pump, pipe, name, send_events.clone())
            nursery.start_soon(_read_frames, stream, send_events.clone(), config.state_max_bytes, kernel)
            send_events.close()
            await start()
            with trio.move_on_after(config.start_timeout_s) as waiting:
                try:
                    await kernel.reply(protocol.READY)
                except KernelDied:
                    waiting.cancel()
            if waiting.cancelled_caught:
                jail_log = kernel.log_tail.decode(errors="replace")
                log.error("a kernel did not start", extra={"fields": {"jail_log": jail_log}})
                raise KernelStartFailed()
            task_status.started(kernel)
            try:
                await jail.process.wait()
            finally:
                kernel.broken = True
                nursery.cancel_scope.cancel()


JailParts = tuple["Launch | ForkedJail", trio.SocketStream, "trio.lowlevel.FdStream | None",
                  Callable[[], Awaitable[None]]]  # fmt: skip


@contextlib.asynccontextmanager
async def _jail(config: KernelConfig, slot: int, identity: Identity, active: set[Path],
                owner: str) -> AsyncIterator[JailParts]:  # fmt: skip
    """The kernel's jail, removed (with everything in it) at the end of the block."""
    if config.zygote is not None:
        try:
            async with _forked(config, config.zygote, slot, identity, active, owner) as parts:
                yield parts
            return
        except ZygoteUnavailable:
            if not config.zygote_fallback:
                raise
            log.warning("the zygote is down: this kernel starts in a fresh nsjail")
    async with _nsjail(config, identity, active, owner) as parts:
        yield parts


@contextlib.asynccontextmanager
async def _nsjail(config: KernelConfig, identity: Identity, active: set[Path],
                  owner: str) -> AsyncIterator[JailParts]:  # fmt: skip
    host_end, jail_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    jail_fd = jail_end.fileno()  # the launcher inherits it under the same number
    try:
        launch = await prepare(config.launcher, active, identity=identity, pass_fds=(jail_fd,))
    except BaseException:
        host_end.close()
        raise
    finally:
        jail_end.close()
    try:
        egress = await config.egress.connect(launch, owner) if config.egress is not None else None
        paths = replace(config.paths, run_dir=launch.run_dir, log_fd=launch.log_fd)
        argv = build_kernel_argv(config.python, config.limits, paths, identity, kernel_dir=config.kernel_dir,
                                 socket_fd=jail_fd, egress=egress)  # fmt: skip
        if launch.cgroup is not None:
            launch.cgroup.set_limits(config.limits.memory_bytes, config.limits.pids)

        async def start() -> None:
            try:
                await launch.start(argv)
            finally:
                launch.close_log_write_end()

        yield launch, trio.SocketStream(trio.socket.from_stdlib_socket(host_end)), launch.log_pipe, start
    finally:
        with trio.CancelScope(shield=True):
            host_end.close()
            try:
                await discard(launch, active)
            except Exception:  # one kernel's cleanup trouble must never take the pool (and every kernel) down
                log.exception("a kernel's jail could not be cleaned up")


@contextlib.asynccontextmanager
async def _forked(config: KernelConfig, zygote: Zygote, slot: int, identity: Identity, active: set[Path],
                  owner: str) -> AsyncIterator[JailParts]:  # fmt: skip
    launcher = config.launcher
    host_end, jail_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host = trio.socket.from_stdlib_socket(host_end)
    run_dir: Path | None = None
    cgroup: RunCgroup | None = None
    process: ForkedProcess | None = None
    tap: Tap | None = None
    try:
        deps = (await config.egress.jail_for(owner)).deps if config.egress is not None else None
        run_id, run_dir, cgroup = make_run_paths(launcher, active, identity, config.limits.memory_bytes,
                                                 config.limits.pids)  # fmt: skip
        process, listener = await zygote.spawn(slot, run_dir, cgroup, host, jail_end, deps)
        if config.egress is not None and listener is not None:
            tap = config.egress.attach(listener, run_id, owner)
    except OSError as exc:
        if not isinstance(exc, ZygoteUnavailable):
            log.error("a zygote kernel did not start", extra={"fields": {
                "error": str(exc), "zygote_log": zygote.log_tail.decode(errors="replace")[-1000:]}})  # fmt: skip
        await _forked_cleanup(host, None, run_dir, cgroup, active)
        if isinstance(exc, ZygoteUnavailable):
            raise
        raise KernelStartFailed() from None
    except BaseException:
        jail_end.close()
        await _forked_cleanup(host, process, run_dir, cgroup, active)
        raise
    try:
        yield ForkedJail(run_id, run_dir, cgroup, process, tap), trio.SocketStream(host), None, _nothing
    finally:
        if tap is not None:
            tap.close()
        await _forked_cleanup(host, process, run_dir, cgroup, active)


async def _nothing() -> None:
    """A forked kernel is running already when its jail exists."""


async def _forked_cleanup(host: trio.socket.SocketType, process: ForkedProcess | None, run_dir: Path | None,
                          cgroup: RunCgroup | None, active: set[Path]) -> None:  # fmt: skip
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
        host.close()
        if process is not None:
            process.kill()
            await process.wait()
            process.close()
            await process.stdout.aclose()
            await process.stderr.aclose()
        if run_dir is not None:
            try:
                await trio.to_thread.run_sync(release_paths, run_dir, cgroup)
            except Exception:  # one kernel's cleanup trouble must never take the pool (and every kernel) down
                log.exception("a kernel's jail could not be cleaned up")
            active.discard(run_dir)


async def _pump(stream: trio.abc.ReceiveStream, name: str, events: trio.MemorySendChannel[Event]) -> None:
    """The kernel's stdout or stderr (the user's fd 1 or 2) into its events; a full channel blocks the writer."""
    async with events:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await stream.receive_some(65536):
                await events.send(("out", name, chunk))
        await events.send(("closed", name, None))


async def _read_frames(stream: trio.SocketStream, events: trio.MemorySendChannel[Event], state_max: int,
                       kernel: Kernel) -> None:  # fmt: skip
    """The kernel's frames into its events. A protocol error, an oversized frame or EOF ends the kernel: it is
    marked broken at once, since its jail may take a while to end (an idle pool kernel killed from outside
    must not be handed out meanwhile)."""
    buffer = bytearray()

    async def exactly(count: int) -> bytes:
        while len(buffer) < count:
            chunk = await stream.receive_some(max(65536, count - len(buffer)))
            if not chunk:
                raise KernelDied("the kernel ended")
            buffer.extend(chunk)
        data = bytes(buffer[:count])
        del buffer[:count]
        return data

    async with events:
        try:
            while True:
                rest, kind, header_length = protocol.decode_prefix(await exactly(protocol.PREFIX.size),
                                                                   state_max + FRAME_MAX)  # fmt: skip
                if kind != protocol.STATE and rest > FRAME_MAX:
                    raise protocol.ProtocolError("an oversized frame")
                header, payload = protocol.decode_body(await exactly(rest), header_length)
                await events.send(("frame", (kind, header), payload))
        except protocol.ProtocolError as exc:
            kernel.broken = True
            await events.send(("dead", f"the kernel broke the protocol ({exc})", None))
        except (KernelDied, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            kernel.broken = True
            await events.send(("dead", str(exc) or "the kernel ended", None))
