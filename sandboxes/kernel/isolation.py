"""A zygote child's isolation, done in the child itself before any user code (runs in the jail).

The zygote's jail gives it a user namespace where it has capabilities, read-only /usr and the
venv, no network and no run directories. A child forked for a session (already pid 1 of a new PID
namespace, already in its own cgroup: the host put it there) takes the rest of what nsjail gives a
one-shot run: its own mount, IPC, UTS and network namespaces, its run directory at /mnt/data (a
mount the host cloned with open_tree and passed as an fd), private /tmp, /dev/shm and a fresh
read-only /proc, the run's rlimits and CPUs, then gives up everything: the bounding set, root (its
slot's uid), every capability, with securebits locked, no_new_privs, and the seccomp filter the
zygote compiled once from the same deny-list as nsjail's policy.

Standard library only: libc and libseccomp through ctypes.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import socket
import struct
from dataclasses import dataclass
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x4000, 1 << 18
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 24, 28, 38, 22
PR_SET_DUMPABLE, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 4, 47, 4
SECCOMP_MODE_FILTER = 2
# noroot, no_setuid_fixup off, keep_caps off, no_cap_ambient_raise: each with its lock bit.
SECUREBITS = 0x01 | 0x02 | 0x20 | 0x40 | 0x80
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


def setns(fd: int, kind: int) -> None:
    _check(libc.setns(fd, kind), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def text(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    _check(libc.mount(text(source), text(target), text(fstype), ctypes.c_ulong(flags), text(data)), f"mount {target}")


def move_mount(tree_fd: int, target: str) -> None:
    _check(libc.syscall(SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           "move_mount")  # fmt: skip


def prctl(option: int, arg2: int = 0, arg3: Any = 0) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg2), arg3, ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl {option}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_all_capabilities() -> None:
    """Empty effective, permitted and inheritable sets (setresuid leaves the inheritable set as it was)."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as file:
        return int(file.read())


def loopback_up() -> None:
    """Bring ``lo`` up in the new network namespace (as nsjail does): local sockets work, nothing else exists."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


@dataclass(frozen=True)
class ChildLimits:
    """What the host configured for every kernel (passed to the zygote once, at its start)."""

    uid_base: int  # slot n runs as uid_base + n (the same number inside and outside: identity mapping)
    tmp_bytes: int
    shm_bytes: int
    fsize_bytes: int
    nofile: int
    max_cpus: int
    share_network: bool = False  # ENABLE_NETWORK_ISOLATION=false
    hostname: str = "sandbox"
    egress_port: int = 0  # ENABLE_SANDBOX_NETWORK: the proxy's port on the child's own loopback (0: none)
    deps_dir: str = "/opt/skill-deps"


def isolate(slot: int, run_tree: int, limits: ChildLimits, seccomp_program: bytes, deps_tree: int = -1) -> None:
    """Everything between the fork and the kernel; raises OSError when a step fails (the child then exits).

    ``deps_tree``: the principal's package cache (a mount, like ``run_tree``), with the network on.
    """
    unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if limits.share_network else CLONE_NEWNET))
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    move_mount(run_tree, "/mnt/data")
    os.close(run_tree)
    if deps_tree >= 0:
        move_mount(deps_tree, limits.deps_dir)
        os.close(deps_tree)
        os.umask(0)  # every uid of the principal's kernels writes what earlier ones installed
    for path, size in (("/tmp", limits.tmp_bytes), ("/dev/shm", limits.shm_bytes)):
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    socket.sethostname(limits.hostname)
    if not limits.share_network:
        loopback_up()
    for kind, value in ((resource.RLIMIT_FSIZE, limits.fsize_bytes), (resource.RLIMIT_NOFILE, limits.nofile),
                        (resource.RLIMIT_CORE, 0)):  # fmt: skip
        resource.setrlimit(kind, (value, value))
    cpus = sorted(os.sched_getaffinity(0))[: limits.max_cpus]
    os.sched_setaffinity(0, cpus)
    os.chdir("/mnt/data")
    for capability in range(last_capability() + 1):
        prctl(PR_CAPBSET_DROP, capability)
    prctl(PR_SET_SECUREBITS, SECUREBITS)
    uid = limits.uid_base + slot
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    drop_all_capabilities()
    prctl(PR_SET_DUMPABLE, 1)  # the uid change cleared it, which would make /proc/self root's
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    load_seccomp(seccomp_program)


# --- seccomp ---------------------------------------------------------------------------------------------


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Install a compiled BPF program (8 bytes per instruction) on this process."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog))


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]  # fmt: skip


SCMP_ACT_ALLOW, SCMP_ACT_KILL_PROCESS = 0x7FFF0000, 0x80000000
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def compile_seccomp(policy: dict[str, Any]) -> bytes:
    """The BPF program of the host's deny-list (sandboxes/jail.py), built once with libseccomp.

    ``policy``: ``deny`` (names answered EPERM), ``enosys`` (names answered ENOSYS), ``clone_new_flags``
    (clone with any of these bits is EPERM), ``ioctl_denied`` (ioctl requests), ``socket_families``
    (socket domains). Another architecture's syscalls (i386, x32) kill the process.
    """
    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)  # by name: find_library needs ldconfig
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp)]  # fmt: skip
    seccomp.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    seccomp.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    seccomp.seccomp_release.argtypes = [ctypes.c_void_p]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = seccomp.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        _check(seccomp.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS), "seccomp_attr_set")

        def rule(action: int, name: str, *comparisons: tuple[int, int, int, int]) -> None:
            number = seccomp.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                return  # not a syscall on this architecture (an alias of another name)
            args = (_ArgCmp * max(1, len(comparisons)))(*[_ArgCmp(*c) for c in comparisons])
            _check(seccomp.seccomp_rule_add_array(ctx, action, number, len(comparisons), args), f"rule {name}")

        for name in policy["deny"]:
            rule(_errno_action(1), name)
        for name in policy["enosys"]:
            rule(_errno_action(38), name)
        for bit in range(64):
            if policy["clone_new_flags"] >> bit & 1:
                rule(_errno_action(1), "clone", (0, SCMP_CMP_MASKED_EQ, 1 << bit, 1 << bit))
        for request in policy["ioctl_denied"]:
            rule(_errno_action(1), "ioctl", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
        for family in policy["socket_families"]:
            rule(_errno_action(1), "socket", (0, SCMP_CMP_EQ, family, 0))
        read_end, write_end = os.pipe()
        try:
            _check(seccomp.seccomp_export_bpf(ctx, write_end), "seccomp_export_bpf")
            os.close(write_end)
            write_end = -1
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    finally:
        seccomp.seccomp_release(ctx)
