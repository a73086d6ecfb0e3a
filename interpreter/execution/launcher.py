"""Launchers: everything of a run that does not depend on the request, made ready before it arrives.

A launcher is a run directory (tmpfs mounted), a run cgroup, and a small shell already inside that
cgroup, waiting on a pipe for the nsjail command line to exec. Joining a cgroup makes the kernel wait
for an RCU grace period (measured: up to ~16 ms on cgroup v1), so it is done ahead of time, off the
request's path. The executor keeps one ready per run slot and makes a new one as each is taken.
With the sandbox network on, a launcher also has a network namespace of its own with the egress
proxy's listener in it (``interpreter/egress/netns.py``), and execs nsjail inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from interpreter.egress.netns import NSENTER, listen_in_new_namespace
from interpreter.egress.proxy import Tap
from sandboxes.host import HostLayout, RunCgroup, create_run_cgroup, mount_tmpfs, remove_cgroup_tree, remove_run_dir
from sandboxes.jail import Cgroups, Identity

log = logging.getLogger("interpreter.execution")

# bash: join each cgroup given, read the NUL-separated command line from the argv pipe, exec it.
LAUNCH_SCRIPT = (
    'fd=$1; shift; for f in "$@"; do echo $$ > "$f" || exit 125; done; '
    'mapfile -d "" -t -u "$fd" argv || exit 125; exec {fd}<&-; exec "${argv[@]}"'
)
CLEANUP_S = 5
RETRY_S = 1.0


@dataclass
class Launch:
    run_id: str
    run_dir: Path
    cgroup: RunCgroup | None
    process: trio.Process
    argv_pipe: trio.lowlevel.FdStream  # write end: the command line, then EOF
    log_fd: int  # the write end's number as nsjail sees it (--log_fd); ours is closed once nsjail has it
    log_pipe: trio.lowlevel.FdStream  # read end: nsjail's own log
    log_fd_open: bool = True
    netns_fd: int | None = None  # the launcher's fd of its network namespace (sandbox network on)
    listener: socket.socket | None = None  # the proxy's socket in that namespace, until the proxy takes it
    tap: Tap | None = None  # the proxy serving it

    def take_listener(self) -> socket.socket:
        assert self.listener is not None
        listener, self.listener = self.listener, None
        return listener

    def close_network(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.tap is not None:
            self.tap.close()

    def close_log_write_end(self) -> None:
        """Once nsjail holds the log pipe, EOF on it means nsjail is gone. Closed once: fd numbers get reused."""
        if self.log_fd_open:
            self.log_fd_open = False
            os.close(self.log_fd)

    async def start(self, argv: list[str]) -> None:
        """Hand the command line over; the launcher execs it at once (in its network namespace, if it has one)."""
        if self.netns_fd is not None:
            argv = [NSENTER, f"--net=/proc/self/fd/{self.netns_fd}", "--", *argv]
        async with self.argv_pipe:
            await self.argv_pipe.send_all(b"".join(arg.encode() + b"\0" for arg in argv))


@dataclass(frozen=True)
class LauncherConfig:
    layout: HostLayout
    identity: Identity
    cgroups: Cgroups | None
    run_dir_bytes: int
    memory_bytes: int  # the default limits; a run resets them for its language before it starts
    pids: int = 64
    egress_port: int | None = None  # ENABLE_SANDBOX_NETWORK: each launcher gets a namespace with the proxy in it


async def prepare(
    config: LauncherConfig, active: set[Path], *, identity: Identity | None = None, pass_fds: tuple[int, ...] = ()
) -> Launch:
    """Mount a run directory, create and join a run cgroup, and leave a launcher waiting there.

    ``identity`` owns the run directory (default: the config's); ``pass_fds`` reach nsjail (kernels' sockets).
    """
    run_id, run_dir, cgroup = make_run_paths(config, active, identity or config.identity, config.memory_bytes,
                                             config.pids)  # fmt: skip
    netns, listener = None, None
    handed_over: list[int] = []  # closed here in any case: the launcher has its own copies
    kept: list[int] = []  # ours from here on, closed here only if this fails
    try:
        if config.egress_port is not None:
            netns, listener = await trio.to_thread.run_sync(listen_in_new_namespace, config.egress_port)
            handed_over.append(netns)  # (the listener keeps the namespace alive)
            pass_fds = (*pass_fds, netns)
        argv_read, argv_write = os.pipe()
        handed_over.append(argv_read)
        kept.append(argv_write)
        log_read, log_write = os.pipe()
        kept += [log_read, log_write]  # log_write until nsjail has it: the runner closes it when the jail starts
        procs = [str(path) for path in cgroup.procs_files] if cgroup else []
        process = await trio.lowlevel.open_process(
            ["/bin/bash", "-c", LAUNCH_SCRIPT, "launcher", str(argv_read), *procs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(argv_read, log_write, *pass_fds), env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
        )  # fmt: skip
        return Launch(run_id, run_dir, cgroup, process, trio.lowlevel.FdStream(argv_write), log_write,
                      trio.lowlevel.FdStream(log_read), netns_fd=netns, listener=listener)  # fmt: skip
    except BaseException:
        for fd in kept:
            os.close(fd)
        if listener is not None:
            listener.close()
        with trio.move_on_after(CLEANUP_S, shield=True):
            await trio.to_thread.run_sync(release_paths, run_dir, cgroup)
        active.discard(run_dir)
        raise
    finally:
        for fd in handed_over:
            os.close(fd)


def make_run_paths(config: LauncherConfig, active: set[Path], identity: Identity, memory_bytes: int,
                   pids: int) -> tuple[str, Path, RunCgroup | None]:  # fmt: skip
    """A new run directory (a mounted tmpfs owned by ``identity``) and run cgroup with these limits.

    The directory is in ``active`` before it exists (the reaper never takes it for a leftover); on failure
    whatever was made is removed again.
    """
    run_id = secrets.token_hex(8)
    run_dir = config.layout.runs / run_id
    active.add(run_dir)
    cgroup: RunCgroup | None = None
    try:
        run_dir.mkdir(mode=0o700)
        mount_tmpfs(run_dir, config.run_dir_bytes, identity.uid, identity.gid)
        if config.cgroups is not None:
            cgroup = create_run_cgroup(config.cgroups, f"run-{run_id}", memory_bytes, pids)
    except BaseException:
        release_paths(run_dir, cgroup)
        active.discard(run_dir)
        raise
    return run_id, run_dir, cgroup


async def drain_tail(stream: trio.abc.ReceiveStream, tail: bytearray, keep: int = 4096) -> None:
    """Read a pipe to its end, keeping its last ``keep`` bytes for diagnostics (an unread pipe would block
    its writer: nsjail, or the zygote)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while chunk := await stream.receive_some(65536):
            tail += chunk
            del tail[: max(0, len(tail) - keep)]


def release_paths(run_dir: Path, cgroup: RunCgroup | None) -> None:
    """Unmount and remove the run directory, kill whatever is left in the cgroup and remove it."""
    remove_run_dir(run_dir)
    if cgroup is not None:
        for directory in cgroup.directories:
            remove_cgroup_tree(directory)


async def discard(launch: Launch, active: set[Path]) -> None:
    """Give up a launcher that will not be used (shutdown, or it died while waiting)."""
    with trio.move_on_after(CLEANUP_S, shield=True):
        launch.close_network()
        await launch.argv_pipe.aclose()
        await launch.log_pipe.aclose()
        launch.close_log_write_end()
        if launch.process.returncode is None:
            launch.process.kill()
            await launch.process.wait()
        for stream in (launch.process.stdin, launch.process.stdout, launch.process.stderr):
            if stream is not None:
                await stream.aclose()
        await trio.to_thread.run_sync(release_paths, launch.run_dir, launch.cgroup)
    active.discard(launch.run_dir)


class LauncherPool:
    """Keeps ``size`` launchers ready (STYLE §1: a service that refills on an event, never polls)."""

    def __init__(self, config: LauncherConfig, size: int, active: set[Path]) -> None:
        self.config, self.size, self.active = config, size, active
        self._ready: list[Launch] = []
        self._taken = trio.Event()

    def prepared(self) -> list[str]:
        """Run ids of the launchers waiting (their run directories and cgroups exist before any run)."""
        return sorted(launch.run_id for launch in self._ready)

    def take_nowait(self) -> Launch | None:
        launch = self._ready.pop() if self._ready else None
        self._taken.set()
        return launch

    async def prepare_now(self) -> Launch:
        """For when none is ready (a burst): prepare one on the request's own time."""
        return await prepare(self.config, self.active)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Ready at once (runs fall back to preparing their own); on cancellation every launcher is discarded."""
        task_status.started()
        try:
            while True:
                try:
                    while len(self._ready) < self.size:
                        self._ready.append(await prepare(self.config, self.active))
                except OSError as exc:
                    # The host is short of something (mounts, memory): runs prepare their own meanwhile.
                    log.warning("could not prepare a launcher", extra={"fields": {"error": exc.strerror}})
                    await trio.sleep(RETRY_S)
                    continue
                self._taken = trio.Event()
                await self._taken.wait()
        finally:
            ready, self._ready = self._ready, []
            for launch in ready:
                await discard(launch, self.active)
