"""Host-side preparation for jails: the instance lock, run directories, generated /etc, cgroup parents.

Run directories are tmpfs mounts of MAX_RUN_DIR_MB made by the host under
``<SANDBOX_BASE_DIR>/runs``: filling one gives the program ENOSPC, and removing one is an unmount,
which never follows anything a sandbox planted inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sandboxes.cgroups import detect_cgroups
from sandboxes.jail import RUNTIME_ETC, Cgroups

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2
RMDIR_ATTEMPTS = 40
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class HostError(Exception):
    """The host cannot prepare a jail (not root, no tmpfs, lock held, ...)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount_tmpfs(path: Path, size_bytes: int, uid: int, gid: int) -> None:
    options = f"size={size_bytes},mode=0700,uid={uid},gid={gid}".encode()
    # noexec is deliberately off: compiled programs run from /tmp, scripts may exec files they write.
    _check(_libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), "mount tmpfs")


def unmount(path: Path) -> None:
    """Lazy unmount; a path that is not a mount point is fine."""
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        code = ctypes.get_errno()
        raise OSError(code, f"umount: {os.strerror(code)}")


def remove_run_dir(path: Path) -> None:
    """Unmount the run's tmpfs and remove the (now empty) mount point. Never walks the sandbox's files."""
    unmount(path)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        # Not a tmpfs after all (a crash between mkdir and mount leaves an empty dir; anything else is
        # unexpected): remove without following links.
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class HostLayout:
    base: Path
    runs: Path
    etc: Path
    lock: Path

    @classmethod
    def under(cls, base: Path) -> HostLayout:
        return cls(base=base, runs=base / "runs", etc=base / ".runtime" / "etc", lock=base / ".lock")

    @property
    def kernel(self) -> Path:
        """The kernel's code, copied here at start and bound read-only into kernel jails (DESIGN §3)."""
        return self.etc.parent / "kernel"


def prepare_layout(layout: HostLayout, uids: list[int], kernel_source: Path | None = None) -> None:
    """Create the directories (0755: bind sources need o+x on every parent), the generated /etc (an
    account for every sandbox uid) and the kernel's copy."""
    for directory in (layout.base, layout.runs, layout.etc.parent, layout.etc, layout.kernel):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        directory.chmod(0o755)
    accounts = "".join(f"sandbox:x:{uid}:{uid}:sandbox:/tmp:/bin/sh\n" for uid in uids)
    groups = "".join(f"sandbox:x:{uid}:\n" for uid in uids)
    files = {
        "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n{accounts}",
        "group": f"root:x:0:\n{groups}",
        "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "resolv.conf": "# no network in the sandbox\n",
    }
    targets = {layout.etc / name: text for name, text in files.items()}
    if kernel_source is not None:
        targets |= {layout.kernel / source.name: source.read_text() for source in kernel_source.glob("*.py")}
    for target, text in targets.items():
        temporary = target.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.chmod(0o644)
        temporary.replace(target)


def take_instance_lock(path: Path) -> int:
    """An exclusive flock held for the life of the process; a second instance on the same base refuses to start."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostError(f"another instance is using {path.parent} (its lock is held)") from None
    return fd


def cgroup_parent_name(base: Path) -> str:
    """Named after a hash of SANDBOX_BASE_DIR, so two instances never share (or reap) each other's cgroups."""
    return "interpreter-" + hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]


def prepare_cgroups(
    base: Path, root: Path = Path("/sys/fs/cgroup"), mounts_file: Path = Path("/proc/self/mounts")
) -> Cgroups | None:
    """Create our parent cgroup(s); None when cgroups are unusable (doctor explains why)."""
    info = detect_cgroups(root, mounts_file)
    name = cgroup_parent_name(base)
    if info.version == 1 and {"memory", "pids"} <= info.controllers and info.writable_parent:
        for controller in ("memory", "pids"):
            (root / controller / name).mkdir(exist_ok=True)
        swap = (root / "memory" / name / "memory.memsw.limit_in_bytes").exists()
        return Cgroups(version=1, parent=name, root=root, swap_accounting=swap)
    if info.version == 2 and {"memory", "pids"} <= info.controllers and info.writable_parent:
        parent = root / name
        parent.mkdir(exist_ok=True)
        # Children of `parent` get memory and pids limits only if the controllers are delegated down to it.
        for level in (root, parent):
            control = level / "cgroup.subtree_control"
            if control.exists():
                control.write_text("+memory +pids")
        return Cgroups(version=2, parent=name, root=root)
    return None


def existing_runtime_etc(candidates: tuple[str, ...] = RUNTIME_ETC) -> tuple[str, ...]:
    return tuple(path for path in candidates if os.path.exists(path))


@dataclass(frozen=True)
class RunCgroup:
    """The run's own cgroup(s): the memory and pids limits, and where its OOM kills are counted."""

    directories: tuple[Path, ...]
    events: Path  # v1 memory.oom_control, v2 memory.events: both have an "oom_kill N" line
    memory_limit: Path  # v1 memory.limit_in_bytes, v2 memory.max
    swap_limit: Path | None  # v1 memory.memsw.limit_in_bytes (memory + swap), when swap is accounted
    pids_limit: Path

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(directory / "cgroup.procs" for directory in self.directories)

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        """(Re)set the limits; may be called while processes are in the cgroup (a prepared launcher is)."""
        if self.swap_limit is None:
            self.memory_limit.write_text(str(memory_bytes))
        else:
            # v1 wants memory+swap >= memory at every step: raise the larger one first, lower it last.
            current = int(self.memory_limit.read_text() or 0)
            order = (
                (self.swap_limit, self.memory_limit) if memory_bytes > current else (self.memory_limit, self.swap_limit)
            )
            for path in order:
                path.write_text(str(memory_bytes))
        self.pids_limit.write_text(str(pids))


def create_run_cgroup(cgroups: Cgroups, name: str, memory_bytes: int, pids: int) -> RunCgroup:
    if cgroups.version == 2:
        directory = cgroups.root / cgroups.parent / name
        directory.mkdir()
        if (directory / "memory.swap.max").exists():
            (directory / "memory.swap.max").write_text("0")
        run = RunCgroup((directory,), directory / "memory.events", directory / "memory.max", None,
                        directory / "pids.max")  # fmt: skip
    else:
        memory, pid_group = (
            cgroups.root / "memory" / cgroups.parent / name,
            cgroups.root / "pids" / cgroups.parent / name,
        )
        memory.mkdir()
        pid_group.mkdir()
        swap = memory / "memory.memsw.limit_in_bytes" if cgroups.swap_accounting else None
        run = RunCgroup((memory, pid_group), memory / "memory.oom_control", memory / "memory.limit_in_bytes", swap,
                        pid_group / "pids.max")  # fmt: skip
    run.set_limits(memory_bytes, pids)
    return run


def memory_usage(run: RunCgroup) -> int:
    """Bytes the cgroup's processes use now (tmpfs pages included); 0 when unreadable."""
    usage = run.memory_limit.with_name("memory.current" if run.memory_limit.name == "memory.max"
                                        else "memory.usage_in_bytes")  # fmt: skip
    try:
        return int(usage.read_text())
    except (OSError, ValueError):
        return 0


def oom_kills(run: RunCgroup) -> int:
    try:
        for line in run.events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def remove_cgroup_tree(directory: Path) -> bool:
    """rmdir a cgroup and its child cgroups, killing any process still in them. True when it is gone.

    Killing by cgroup membership is exact: a run's nsjail and everything it started are members.
    """
    if not directory.is_dir():
        return True
    for child in directory.iterdir():
        if child.is_dir():
            remove_cgroup_tree(child)
    try:
        members = (directory / "cgroup.procs").read_text().split()
    except OSError:
        members = []
    for pid in members:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    for _ in range(RMDIR_ATTEMPTS):  # killed members take a moment to leave the cgroup
        try:
            directory.rmdir()
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return not directory.exists()
            time.sleep(0.05)
        else:
            return True
    return False


def remove_cgroup_parents(cgroups: Cgroups) -> None:
    """At shutdown: our parent cgroups go too (once their runs are gone), so none pile up across restarts."""
    parents = (
        [cgroups.root / cgroups.parent]
        if cgroups.version == 2
        else [cgroups.root / controller / cgroups.parent for controller in ("memory", "pids")]
    )
    for parent in parents:
        remove_cgroup_tree(parent)
