"""One run of one program in a fresh jail: run directory, nsjail, output as it arrives, a status.

Output chunks go to ``on_output(stream, bytes)`` as they arrive, already capped, so ``/exec`` can
join them and streaming can forward them. A program that fails, times out, runs out of memory or
floods its output is a *result*; only a jail that cannot start is an error (``SandboxBroken``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import trio

from interpreter.egress.service import SandboxNetwork
from interpreter.errors import ServiceUnavailable
from interpreter.execution.launcher import Launch, LauncherPool, discard
from sandboxes.host import HostLayout, oom_kills
from sandboxes.jail import Egress, Identity, Limits, RunPaths, build_argv
from sandboxes.languages import LanguageSpec, source_name

log = logging.getLogger("interpreter.execution")

Status = Literal["ok", "error", "timeout", "memory_limit", "output_limit", "killed"]
OnOutput = Callable[[str, bytes], Awaitable[None]]
KILL_GRACE_S = 0.5  # nsjail kills and reaps the jailed tree on SIGTERM; SIGKILL only if that hangs
CLEANUP_S = 5
DRAIN_S = 2
READ_SIZE = 64 * 1024

_TIME_LIMIT = re.compile(r"run time >= time limit")
_SIGNALLED = re.compile(r"terminated with signal: (SIG\w+)")
_EXECUTING = "Executing '"


class SandboxBroken(ServiceUnavailable):
    """The jail itself could not be set up (not the program's fault)."""

    message = "The sandbox could not be started"


class RunFiles(Protocol):
    """Files that go into the run directory before the jail starts and come out after it ends."""

    async def stage(self, run_dir: Path, source: str, identity: Identity) -> None: ...

    async def collect(self, run_dir: Path, source: str) -> None: ...


@dataclass(frozen=True)
class Job:
    language: LanguageSpec
    code: str
    args: tuple[str, ...] = ()
    stdin: bytes | None = None
    timeout_s: int = 30
    files: RunFiles | None = None
    # More stdin while it runs (streaming clients), after ``stdin``; None in the channel means EOF.
    stdin_stream: trio.MemoryReceiveChannel[bytes | None] | None = None
    owner: str = ""  # the principal's storage prefix (its package cache, with the sandbox network on)


@dataclass
class RunResult:
    status: Status
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool
    duration_ms: int
    signal: str | None = None
    notes: list[str] = field(default_factory=list)
    egress: dict[str, int] | None = None  # what the run did through the egress proxy (sandbox network on)


@dataclass(frozen=True)
class RunnerConfig:
    nsjail: Path
    layout: HostLayout
    venv: Path
    runtime_etc: tuple[str, ...]
    identity: Identity
    memory_bytes: int
    tmp_bytes: int
    fsize_mib: int
    output_cap_bytes: int
    network: bool = False  # ENABLE_NETWORK_ISOLATION=false: the host's network
    egress: SandboxNetwork | None = None  # ENABLE_SANDBOX_NETWORK: the registries, through the proxy


class _Capture:
    """Collects one stream up to the cap; reports whether the cap was hit."""

    def __init__(self, name: str, cap: int, on_output: OnOutput | None) -> None:
        self.name, self.cap, self.on_output = name, cap, on_output
        self.data = bytearray()
        self.overflowed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(READ_SIZE):
            room = self.cap - len(self.data)
            if room <= 0:
                self.overflowed.set()
                return
            kept = chunk[:room]
            self.data += kept
            if self.on_output is not None:
                await self.on_output(self.name, bytes(kept))
            if len(chunk) > room:
                self.overflowed.set()
                return


class Runner:
    def __init__(self, config: RunnerConfig, launchers: LauncherPool) -> None:
        self.config = config
        self.launchers = launchers
        self.active = launchers.active  # run directories in use or prepared; the reaper leaves these alone

    def is_active(self, run_dir: Path) -> bool:
        return run_dir in self.active

    def limits_for(self, spec: LanguageSpec, timeout_s: int) -> Limits:
        return Limits(
            wall_s=max(1, round(timeout_s * spec.timeout_multiplier)),
            memory_bytes=int(self.config.memory_bytes * spec.memory_multiplier),
            pids=spec.pids,
            fsize_mib=self.config.fsize_mib,
            tmp_bytes=self.config.tmp_bytes,
            network=self.config.network,
        )

    async def _launcher(self) -> Launch:
        launch = self.launchers.take_nowait()
        if launch is not None and launch.process.returncode is None:
            return launch
        if launch is not None:  # it died while it waited
            await discard(launch, self.active)
        return await self.launchers.prepare_now()

    async def steps(self, job: Job, on_output: OnOutput | None = None) -> AsyncGenerator[RunResult, None]:
        """``run`` as executor work (it has nothing to do after its result)."""
        yield await self.run(job, on_output)

    async def run(self, job: Job, on_output: OnOutput | None = None) -> RunResult:
        cfg = self.config
        limits = self.limits_for(job.language, job.timeout_s)
        launch = await self._launcher()
        try:
            egress = await cfg.egress.connect(launch, job.owner) if cfg.egress is not None else None
            if launch.cgroup is not None:
                launch.cgroup.set_limits(limits.memory_bytes, limits.pids)
            if job.language.source_naming == "fixed":
                source, main = source_name(job.language, job.code)
            else:  # Java's class detection reads the whole source: off the event loop
                source, main = await trio.to_thread.run_sync(source_name, job.language, job.code)
            _write_source(launch.run_dir / source, job.code, cfg.identity)
            if job.files is not None:
                await job.files.stage(launch.run_dir, source, cfg.identity)
            result = await self._run_jail(job, limits, launch, source, main, on_output, egress)
            result.egress = launch.tap.figures() if launch.tap is not None else None
            if job.files is not None:
                await job.files.collect(launch.run_dir, source)
            return result
        finally:
            await discard(launch, self.active)  # stops whatever is left, unmounts, removes the cgroup

    async def _run_jail(self, job: Job, limits: Limits, launch: Launch, source: str, main: str,
                        on_output: OnOutput | None, egress: Egress | None) -> RunResult:  # fmt: skip
        cfg = self.config
        paths = RunPaths(
            nsjail=cfg.nsjail,
            run_dir=launch.run_dir,
            etc_dir=cfg.layout.etc,
            venv=cfg.venv,
            runtime_etc=cfg.runtime_etc,
            log_fd=launch.log_fd,
        )
        argv = build_argv(job.language, limits, paths, cfg.identity, source=source, main=main, args=job.args,
                          egress=egress)  # fmt: skip
        proc = launch.process
        started = time.monotonic()
        try:
            await launch.start(argv)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SandboxBroken() from None
        finally:
            launch.close_log_write_end()
        out = _Capture("stdout", cfg.output_cap_bytes, on_output)
        err = _Capture("stderr", cfg.output_cap_bytes, on_output)
        jail_log = bytearray()
        timed_out = flooded = False
        try:
            async with trio.open_nursery() as nursery:
                assert proc.stdout is not None
                assert proc.stderr is not None
                assert proc.stdin is not None
                nursery.start_soon(_feed_stdin, proc.stdin, job.stdin, job.stdin_stream)

                async def stop_on_flood() -> None:
                    nonlocal flooded
                    async with trio.open_nursery() as race:
                        for capture in (out, err):
                            race.start_soon(_set_then_cancel, capture.overflowed, race.cancel_scope)
                    flooded = True
                    await _stop(proc)

                nursery.start_soon(stop_on_flood)
                async with trio.open_nursery() as readers:
                    readers.start_soon(out.pump, proc.stdout)
                    readers.start_soon(err.pump, proc.stderr)
                    readers.start_soon(_read_all, launch.log_pipe, jail_log)
                    with trio.move_on_after(limits.wall_s) as wall_clock:
                        await proc.wait()
                    if wall_clock.cancelled_caught:
                        timed_out = True
                        await _stop(proc)
                    # The jail is gone, so the pipes are closing: let the readers take what is left in them.
                    readers.cancel_scope.deadline = trio.current_time() + DRAIN_S
                nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                with trio.move_on_after(CLEANUP_S, shield=True):
                    await _stop(proc)
        duration_ms = int((time.monotonic() - started) * 1000)
        text = jail_log.decode(errors="replace")
        if _EXECUTING not in text:
            log.error("nsjail could not start the jail", extra={"fields": {"jail_log": text[-2000:]}})
            raise SandboxBroken()
        oom = oom_kills(launch.cgroup) if launch.cgroup is not None else 0
        return _classify(proc.returncode, text, limits, timed_out, flooded, oom, out, err, duration_ms)


def _classify(
    returncode: int | None, jail_log: str, limits: Limits, timed_out: bool, flooded: bool, oom_kills: int,
    out: _Capture, err: _Capture, duration_ms: int,
) -> RunResult:  # fmt: skip
    signalled = _SIGNALLED.search(jail_log)
    signal_name = signalled.group(1) if signalled else None
    status: Status
    notes: list[str] = []
    if flooded:
        status = "output_limit"
        notes.append(f"Output exceeded the limit of {out.cap} bytes per stream; the program was stopped.")
    elif timed_out or _TIME_LIMIT.search(jail_log):
        status = "timeout"
        notes.append(f"Execution timed out after {limits.wall_s} s.")
    elif oom_kills:
        # The run's own cgroup counted an OOM kill: a process of the run was killed for memory.
        status = "memory_limit"
        notes.append(f"The program was killed: it exceeded the memory limit of {limits.memory_bytes // 2**20} MiB.")
    elif returncode == 0:
        status = "ok"
    else:
        status = "error"
    return RunResult(
        status=status, exit_code=returncode, stdout=bytes(out.data), stderr=bytes(err.data),
        truncated=flooded, duration_ms=duration_ms, signal=signal_name, notes=notes,
    )  # fmt: skip


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _read_all(stream: trio.lowlevel.FdStream, into: bytearray) -> None:
    async with stream:
        while chunk := await stream.receive_some(READ_SIZE):
            if len(into) < 1 << 20:  # nsjail's own log; bounded in case of a pathological run
                into += chunk


async def _feed_stdin(
    stream: trio.abc.SendStream, data: bytes | None, more: trio.MemoryReceiveChannel[bytes | None] | None
) -> None:
    """Feed the user's stdin (then what streams in), then EOF. A program that exits without reading it is fine."""
    try:
        async with stream:
            if data:
                await stream.send_all(data)
            if more is not None:
                async for chunk in more:
                    if chunk is None:
                        break
                    await stream.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _stop(proc: trio.Process) -> None:
    """SIGTERM nsjail (it kills the jailed tree and removes its cgroups), SIGKILL if it lingers."""
    if proc.returncode is not None:
        return
    proc.terminate()
    with trio.move_on_after(KILL_GRACE_S):
        await proc.wait()
        return
    proc.kill()
    await proc.wait()


def _write_source(path: os.PathLike[str], code: str, identity: Identity) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchown(fd, identity.uid, identity.gid)
        data = code.encode("utf-8", errors="surrogatepass")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
