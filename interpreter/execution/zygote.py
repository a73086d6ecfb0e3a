"""Zygote kernels (KERNEL_MODE=zygote): a new Python kernel forked in ~5 ms instead of started in ~0.5 s.

One zygote per node (``sandboxes/kernel/zygote.py``) runs in an nsjail jail of its own with
everything pre-imported. To start a kernel the host makes what it makes for any kernel (a run
directory, a cgroup with the kernel's limits, the stdout/stderr pipes and the protocol socket) and
sends the zygote a slot number with those as file descriptors, the run directory as an
``open_tree`` mount (the zygote never sees a path). The child says hello on the protocol socket;
the host reads the child's pid from the socket's credentials (``SO_PASSCRED``: translated into the
host's PID namespace by the kernel), moves it into the kernel's cgroup, and only then says "go":
the child isolates itself and the kernel starts. From there on it is a kernel like any other.

The service restarts a zygote that dies (its kernels die with it: they are in its PID namespace;
their sessions come back from their checkpoints); the zygote rotates itself (re-exec in place) after
ZYGOTE_ROTATE_SESSIONS sessions or ZYGOTE_ROTATE_MINUTES without touching live kernels.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import trio

from interpreter.egress.proxy import Tap
from interpreter.errors import ServiceUnavailable
from interpreter.execution.launcher import drain_tail
from sandboxes.host import RunCgroup
from sandboxes.jail import DEPS_DIR, Egress, Limits, RunPaths, build_zygote_argv, child_seccomp, kernel_env
from sandboxes.kernel.isolation import ChildLimits
from sandboxes.languages import LanguageSpec

log = logging.getLogger("interpreter.zygote")

SYS_OPEN_TREE = 428
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_RECURSIVE = 1, os.O_CLOEXEC, 0x8000
AT_FDCWD = -100
ZYGOTE_OOM_SCORE_ADJ = "-500"  # the kernels' OOM victims come first; the zygote is every new session
KERNEL_OOM_SCORE_ADJ = "0"
RESTART_DELAY_S = (0.5, 30.0)
UCRED = struct.Struct("iII")  # pid, uid, gid

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ZygoteUnavailable(ServiceUnavailable):
    message = "Python kernels cannot be started right now"


def open_tree(path: Path) -> int:
    """A detached copy of the mount at ``path`` (the run directory), as an fd the zygote can move_mount."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, str(path).encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"open_tree: {os.strerror(code)}")
    return int(fd)


def supported() -> str | None:
    """Why zygote kernels cannot work on this host (None: they can)."""
    try:
        os.close(open_tree(Path("/")))
    except OSError as exc:
        return f"the kernel has no open_tree ({exc.strerror}): Linux 5.2 or later is needed"
    if not hasattr(os, "pidfd_open"):
        return "this Python has no pidfd_open"
    if not any(Path(d, "libseccomp.so.2").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")):
        return "libseccomp.so.2 is missing (apt-get install libseccomp2)"
    return None


@dataclass(frozen=True)
class ZygoteConfig:
    python: LanguageSpec
    limits: Limits  # the kernels' limits (memory and pids are their cgroups')
    paths: RunPaths
    kernel_dir: Path
    base_uid: int  # SANDBOX_UID: the zygote's root is base+1, slot n is base+2+n
    slots: int
    rotate_sessions: int
    rotate_s: float
    start_timeout_s: float
    egress: Egress | None = None  # ENABLE_SANDBOX_NETWORK: each child gets a package cache and a listener

    def argv(self, control_fd: int) -> list[str]:
        child_limits = ChildLimits(
            uid_base=self.base_uid + 2, tmp_bytes=self.limits.tmp_bytes, shm_bytes=self.limits.shm_bytes,
            fsize_bytes=self.limits.fsize_mib * 1024 * 1024, nofile=self.limits.nofile,
            max_cpus=self.limits.max_cpus, share_network=self.limits.network,
            egress_port=self.egress.port if self.egress is not None else 0, deps_dir=DEPS_DIR,
        )  # fmt: skip
        config = {"limits": asdict(child_limits), "seccomp": child_seccomp(),
                  "env": kernel_env(self.python, self.paths, self.egress), "rotate_sessions": self.rotate_sessions,
                  "rotate_s": self.rotate_s}  # fmt: skip
        return build_zygote_argv(
            self.python, self.limits, self.paths, root_uid=self.base_uid + 1, slot_uid=self.base_uid + 2,
            slots=self.slots, kernel_dir=self.kernel_dir, control_fd=control_fd, config=json.dumps(config),
            egress=self.egress,
        )  # fmt: skip


class ForkedProcess:
    """A kernel forked by the zygote, seen through a pidfd: what the Kernel needs of a process."""

    def __init__(self, pidfd: int, stdout: trio.lowlevel.FdStream, stderr: trio.lowlevel.FdStream) -> None:
        self.pidfd, self.stdout, self.stderr = pidfd, stdout, stderr
        self.returncode: int | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            watched = os.dup(self.pidfd)  # one fd per waiter: trio lets one task wait on an fd at a time
            try:
                await trio.lowlevel.wait_readable(watched)  # readable once the process has exited
            finally:
                os.close(watched)
            self.returncode = -signal.SIGKILL  # (its real status went to its parent, the zygote)
        return self.returncode

    def terminate(self) -> None:
        self.kill()  # the child is its namespace's init: killing it ends the kernel and everything it started

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


@dataclass
class ForkedJail:
    """What a zygote kernel is made of on the host (the counterpart of a launcher's Launch)."""

    run_id: str
    run_dir: Path
    cgroup: RunCgroup | None
    process: ForkedProcess
    tap: Tap | None = None  # the egress proxy serving it (sandbox network on)


class Zygote:
    def __init__(self, config: ZygoteConfig) -> None:
        self.config = config
        self._control: trio.socket.SocketType | None = None
        self._ready = trio.Event()
        self.pid: int | None = None
        self.counters = {"started": 0, "rotations": 0, "spawned": 0, "failures": 0}
        self.log_tail = bytearray()

    def statistics(self) -> dict[str, object]:
        return {"ready": self._ready.is_set(), "pid": self.pid, **self.counters}

    # --- the service ---------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Ready at once (kernel starts wait for the zygote); restarts it whenever it ends."""
        task_status.started()
        delay = RESTART_DELAY_S[0]
        while True:
            began = trio.current_time()
            try:
                await self._run_once()
            except OSError as exc:
                log.error("the zygote could not be started", extra={"fields": {"error": str(exc)}})
            self.counters["failures"] += 1
            log.warning("the zygote ended; starting a new one",
                        extra={"fields": {"log": self.log_tail.decode(errors="replace")[-1000:]}})  # fmt: skip
            delay = RESTART_DELAY_S[0] if trio.current_time() - began > 60 else min(delay * 2, RESTART_DELAY_S[1])
            await trio.sleep(delay)

    async def _run_once(self) -> None:
        host_end, jail_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            process = await trio.lowlevel.open_process(
                self.config.argv(jail_end.fileno()), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=(jail_end.fileno(),), start_new_session=True,
            )  # fmt: skip
        finally:
            jail_end.close()
        control = trio.socket.from_stdlib_socket(host_end)
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None
                nursery.start_soon(drain_tail, process.stdout, self.log_tail)
                nursery.start_soon(self._listen, control)
                await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._control, self._ready, self.pid = None, trio.Event(), None
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            control.close()

    async def _listen(self, control: trio.socket.SocketType) -> None:
        """The zygote's messages: "ready" after each (re)start, with its credentials."""
        while True:
            message, ancillary, _, _ = await control.recvmsg(64, socket.CMSG_SPACE(UCRED.size))
            if not message:
                return
            credentials = _credentials(ancillary)
            if message != b"ready" or credentials is None:
                continue
            pid = credentials[0]
            with contextlib.suppress(OSError):
                await trio.Path(f"/proc/{pid}/oom_score_adj").write_text(ZYGOTE_OOM_SCORE_ADJ)
            self.counters["rotations" if self.pid == pid else "started"] += 1
            self.pid, self._control = pid, control
            self._ready.set()
            log.info("zygote ready", extra={"fields": {"pid": pid}})

    # --- kernels -------------------------------------------------------------------------------------------

    async def spawn(self, slot: int, run_dir: Path, cgroup: RunCgroup | None, host_end: trio.socket.SocketType,
                    jail_end: socket.socket,
                    deps: Path | None = None) -> tuple[ForkedProcess, socket.socket | None]:  # fmt: skip
        """A kernel for ``slot``, forked and isolated, its protocol socket's other end ``jail_end``; with
        ``deps`` (the principal's package cache, sandbox network on) also the proxy's listener it made.

        Raises:
            ZygoteUnavailable: the zygote is not up within REPL_WARMUP_TIMEOUT_SECONDS.
            OSError: the child did not come up (it says hello on ``host_end``, or the socket closes).
        """
        with trio.move_on_after(self.config.start_timeout_s):
            await self._ready.wait()
        control = self._control
        if control is None:
            raise ZygoteUnavailable()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        tree = deps_tree = -1
        try:
            tree = open_tree(run_dir)
            trees = [tree]
            if deps is not None:
                deps_tree = open_tree(deps)
                trees.append(deps_tree)
            host_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            fds = array.array("i", [stdout_w, stderr_w, jail_end.fileno(), *trees])
            await control.sendmsg([struct.pack("=I", slot)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except BaseException:
            for fd in (stdout_r, stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdout_w, stderr_w, tree, deps_tree):
                if fd >= 0:
                    os.close(fd)
            jail_end.close()
        stdout, stderr = trio.lowlevel.FdStream(stdout_r), trio.lowlevel.FdStream(stderr_r)
        try:
            with trio.fail_after(self.config.start_timeout_s):
                pidfd, listener = await _admit(host_end, cgroup, self.config.base_uid + 1, deps is not None)
        except trio.TooSlowError:
            with trio.CancelScope(shield=True):
                await stdout.aclose()
                await stderr.aclose()
            raise OSError("the zygote child did not say hello in time") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await stdout.aclose()
                await stderr.aclose()
            raise
        self.counters["spawned"] += 1
        return ForkedProcess(pidfd, stdout, stderr), listener


async def _admit(sock: trio.socket.SocketType, cgroup: RunCgroup | None, root_uid: int,
                 with_listener: bool) -> tuple[int, socket.socket | None]:  # fmt: skip
    """The child's hello: its pid into the kernel's cgroup, [the proxy's listener it made in its network
    namespace,] then "go". Returns a pidfd of the child [and the listener]."""
    message, ancillary, _, _ = await sock.recvmsg(1, socket.CMSG_SPACE(UCRED.size))
    credentials = _credentials(ancillary)
    if message != b"h" or credentials is None or credentials[1] != root_uid:
        raise OSError("the zygote child did not come up")
    pid = credentials[0]
    pidfd = os.pidfd_open(pid)
    listener = None
    try:
        await trio.to_thread.run_sync(_join, cgroup, pid)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
        if with_listener:
            listener = await _receive_listener(sock)
        await sock.send(b"g")
    except BaseException:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        if listener is not None:
            listener.close()
        raise
    return pidfd, listener


async def _receive_listener(sock: trio.socket.SocketType) -> socket.socket:
    """The child's listening socket (checked: a TCP socket listening on loopback, nothing else)."""
    fds = array.array("i")
    space = socket.CMSG_SPACE(fds.itemsize) + socket.CMSG_SPACE(UCRED.size)
    message, ancillary, _, _ = await sock.recvmsg(1, space, socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    received = [socket.socket(fileno=fd) for fd in fds]
    if message != b"l" or len(received) != 1:
        for extra in received:
            extra.close()
        raise OSError("the zygote child sent no listener")
    listener = received[0]
    if (listener.family != socket.AF_INET or listener.type != socket.SOCK_STREAM
            or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            or not ipaddress.ip_address(listener.getsockname()[0]).is_loopback):  # fmt: skip
        listener.close()
        raise OSError("the zygote child sent something other than a loopback listener")
    return listener


def _join(cgroup: RunCgroup | None, pid: int) -> None:
    """Into the kernel's cgroup, with an ordinary OOM score (the zygote's low one is not the sessions')."""
    Path(f"/proc/{pid}/oom_score_adj").write_text(KERNEL_OOM_SCORE_ADJ)
    for procs in cgroup.procs_files if cgroup is not None else ():
        procs.write_text(str(pid))


def _credentials(ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int, int] | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= UCRED.size:
            pid, uid, gid = UCRED.unpack(data[: UCRED.size])
            return pid, uid, gid
    return None
