"""The nsjail command line of one run: a pure function of the language, the limits and the paths.

What each flag is for is written beside it; the facts behind the runtime mounts come from
jail-runtimes.md (measured on this kind of machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sandboxes.languages import LanguageSpec

# Host configuration a runtime needs, bound read-only when present (jail-runtimes.md §3). Nothing else of
# the host's /etc is visible: no shadow, ssh, ssl keys or anything holding secrets.
RUNTIME_ETC = (
    "/etc/alternatives",  # cc, c++, java, javac, php, which, libblas/liblapack go through it (links only)
    "/etc/java-17-openjdk",  # the JDK's conf/ and security/ are links into it; javac fails without
    "/etc/php",  # php.ini and the module ini files
    "/etc/R",  # R's ldpaths, Renviron, Rprofile.site
    "/etc/ldc2.conf",  # where ldc2 finds druntime and phobos
    "/etc/fonts",  # quiets fontconfig during matplotlib's font scan
)

# seccomp deny-list (kafel). Each family is something a sandbox has no business doing: debugging or
# reading other processes, changing mounts or namespaces, loading kernel code, kernel keyrings, io_uring
# (a history of escapes), TIOCSTI (typing into another terminal), vsock and AF_ALG sockets. clone with
# any CLONE_NEW* flag is EPERM; clone3 is ENOSYS because seccomp cannot read its flags, and glibc then
# falls back to clone.
CLONE_NEW_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
TIOCSTI = 0x5412
# Socket families no network namespace confines: vsock reaches the hypervisor and the host's vsock ports
# (a jail could bind them machine-wide); AF_ALG is the kernel crypto API, a long history of bugs, and
# nothing a program needs (OpenSSL and hashlib work in user space).
AF_ALG, AF_VSOCK = 38, 40
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsmount", "fsconfig",
    "fspick", "mount_setattr", "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kcmp", "pidfd_getfd", "name_to_handle_at", "open_by_handle_at",
    "quotactl", "swapon", "swapoff", "reboot", "acct", "syslog", "lookup_dcookie",
)  # fmt: skip
SECCOMP_POLICY = (
    "ERRNO(1) { "
    + ", ".join(DENIED_SYSCALLS)
    + f", clone(flags) {{ (flags & {CLONE_NEW_FLAGS:#x}) != 0 }}"
    + f", ioctl(fd, cmd) {{ (cmd & 0xffffffff) == {TIOCSTI:#x} }}"
    + f", socket(domain) {{ domain == {AF_VSOCK} || domain == {AF_ALG} }}"
    + " } ERRNO(38) { clone3 } DEFAULT ALLOW"
)

TIME_LIMIT_BACKSTOP_S = 2
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
DEPS_DIR = "/opt/skill-deps"  # the principal's package cache, when the sandbox has the network
CA_CERTS = "/etc/ssl/certs"  # public CA certificates (Go, cargo, curl read them; nothing secret)


@dataclass(frozen=True)
class Limits:
    wall_s: int
    memory_bytes: int
    pids: int
    fsize_mib: int
    tmp_bytes: int
    shm_bytes: int = 64 * 1024 * 1024
    nofile: int = 256  # R needs >= 167
    max_cpus: int = 2  # Go, the JVM and V8 size their thread pools by CPU count; keeps pids bounded
    network: bool = False  # True shares the host network (ENABLE_NETWORK_ISOLATION=false)


@dataclass(frozen=True)
class Egress:
    """A jail's way to package registries (ENABLE_SANDBOX_NETWORK): the proxy on its own loopback, the
    registries' settings, and its principal's package cache at DEPS_DIR."""

    port: int  # the proxy answers 127.0.0.1:port inside the jail's network namespace
    registries_env: tuple[tuple[str, str], ...] = ()  # PIP_INDEX_URL, NPM_CONFIG_REGISTRY, GOPROXY, ...
    deps: Path | None = None  # host side of the cache (nsjail binds it; a zygote child gets it as a mount)

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the proxy, the registries, and every package manager installing into DEPS_DIR."""
        proxy, d = f"http://127.0.0.1:{self.port}", DEPS_DIR
        bins = ":".join(f"{d}/{tool}/bin" for tool in ("python", "node", "go", "cargo"))
        registries = {key: value.replace("{", "{{").replace("}", "}}") for key, value in self.registries_env}
        return {
            **env, **registries,  # (escaped: every value is formatted with the venv's path later)
            "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
            "PIP_TARGET": f"{d}/python", "PIP_CACHE_DIR": f"{d}/cache/pip", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PYTHONPATH": ":".join(filter(None, (env.get("PYTHONPATH"), f"{d}/python"))),
            "NPM_CONFIG_PREFIX": f"{d}/node", "NPM_CONFIG_CACHE": f"{d}/cache/npm",
            "NODE_PATH": f"{d}/node/lib/node_modules",
            "NPM_CONFIG_UPDATE_NOTIFIER": "false", "NPM_CONFIG_FUND": "false", "NPM_CONFIG_AUDIT": "false",
            "GOPATH": f"{d}/go", "GOMODCACHE": f"{d}/go/pkg/mod",
            # -modcacherw: the module cache stays writable for the tenant's other uids
            "GOFLAGS": " ".join(filter(None, (env.get("GOFLAGS"), "-modcacherw"))),
            "CARGO_HOME": f"{d}/cargo",
            # pip (the sandbox venv's, installing into DEPS_DIR) is on PATH after the system's tools
            "PATH": f"{bins}:{env.get('PATH', BASE_ENV['PATH'])}:{{venv}}/bin",
        }  # fmt: skip


@dataclass(frozen=True)
class Cgroups:
    """Where this instance's cgroups live. Memory and pids limits are set on a cgroup of our own per
    run, which nsjail is started in (so everything it forks is in it too), not through nsjail's flags:
    that cgroup outlives nsjail, so its OOM-kill count can be read afterwards (interpreter/execution/
    launcher.py)."""

    version: Literal[1, 2]
    parent: str  # our parent cgroup's name (v1: below each controller's mount; v2: below the root)
    root: Path = Path("/sys/fs/cgroup")
    swap_accounting: bool = True  # v1: memory.memsw.* exists


@dataclass(frozen=True)
class RunPaths:
    nsjail: Path
    run_dir: Path  # host side, mounted at /mnt/data
    etc_dir: Path  # generated passwd, group, hosts, resolv.conf
    venv: Path
    runtime_etc: tuple[str, ...] = field(default_factory=tuple)  # which RUNTIME_ETC entries exist here
    log_fd: int | None = None


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


def heap_mib(limits: Limits) -> int:
    """A managed-heap cap (JVM, V8) well below the cgroup limit, so running out is the runtime's own error."""
    return max(64, int(limits.memory_bytes / 1024 / 1024 * 0.75))


def jail_command(spec: LanguageSpec, limits: Limits, paths: RunPaths, source: str, main: str) -> str:
    return spec.command.format(source=source, main=main, heap_mib=heap_mib(limits), venv=paths.venv)


def _jail_argv(limits: Limits, paths: RunPaths, identity: Identity, env: dict[str, str], *, time_limit: str,
               cpu_limit: str, egress: Egress | None = None) -> list[str]:  # fmt: skip
    """Everything of a jail but what it runs: namespaces, mounts, environment, limits, seccomp.

    With ``egress`` the jail joins the network namespace it is started in (the host made it, with the
    proxy's listener in it, and starts nsjail there), and gets the principal's package cache.
    """
    argv = [
        str(paths.nsjail),
        "--mode", "o",  # once: one process tree, then exit with its status
        "--hostname", "sandbox",
        "--user", f"{identity.uid}:{identity.uid}",  # both halves: a bare uid would map to root outside
        "--group", f"{identity.gid}:{identity.gid}",
        "--cwd", "/mnt/data",
        # Root is nsjail's empty tmpfs; /usr (merged-usr) holds every runtime.
        "--bindmount_ro", "/usr",
        "--tmpfsmount", "/usr/local",  # after /usr: hides the host's /usr/local
        "--symlink", "usr/bin:/bin", "--symlink", "usr/lib:/lib", "--symlink", "usr/lib64:/lib64",
        "--bindmount", "/dev/null", "--bindmount_ro", "/dev/urandom", "--bindmount_ro", "/dev/zero",
        "--mount", f"none:/tmp:tmpfs:size={limits.tmp_bytes}",
        "--mount", f"none:/dev/shm:tmpfs:size={limits.shm_bytes}",
        "--bindmount_ro", str(paths.venv),
    ]  # fmt: skip
    for etc in paths.runtime_etc:
        argv += ["--bindmount_ro", etc]
    for name in ("passwd", "group", "hosts", "resolv.conf"):
        argv += ["--bindmount_ro", f"{paths.etc_dir / name}:/etc/{name}"]
    argv += ["--bindmount", f"{paths.run_dir}:/mnt/data"]
    env = {**BASE_ENV, **env}
    if egress is not None:
        assert egress.deps is not None
        argv += ["--bindmount", f"{egress.deps}:{DEPS_DIR}", "--bindmount_ro", CA_CERTS]
        env = egress.env(env)
    for key, value in env.items():
        argv += ["--env", f"{key}={value.format(venv=paths.venv)}"]
    argv += [
        "--time_limit", time_limit,
        "--rlimit_cpu", cpu_limit,
        "--rlimit_as", "inf",  # memory is the cgroup's job; an address-space cap breaks the JVM
        "--rlimit_fsize", str(limits.fsize_mib),
        "--rlimit_nofile", str(limits.nofile),
        "--rlimit_core", "0",
        "--max_cpus", str(limits.max_cpus),
        "--seccomp_string", SECCOMP_POLICY,
    ]  # fmt: skip
    if limits.network or egress is not None:
        argv.append("--disable_clone_newnet")
    if paths.log_fd is not None:
        argv += ["--log_fd", str(paths.log_fd)]
    return argv


def build_argv(
    spec: LanguageSpec,
    limits: Limits,
    paths: RunPaths,
    identity: Identity,
    *,
    source: str,
    main: str = "",
    args: tuple[str, ...] = (),
    egress: Egress | None = None,
) -> list[str]:
    """The full nsjail argv for one run of ``spec``. Pure: reads nothing but its arguments."""
    # The runner's own timer enforces wall_s exactly; nsjail's whole-second clock, checked right at
    # start too, could fire up to a second early, so it is only the backstop.
    argv = _jail_argv(limits, paths, identity, spec.env, time_limit=str(limits.wall_s + TIME_LIMIT_BACKSTOP_S),
                      cpu_limit=str(limits.wall_s * max(1, limits.max_cpus)), egress=egress)  # fmt: skip
    command = umask(egress) + jail_command(spec, limits, paths, source, main)
    return [*argv, "--", "/bin/sh", "-c", command, "sh", *args]


def umask(egress: Egress | None) -> str:
    """With a package cache, files are made for every uid of the principal's jails (nothing else sees them)."""
    return "umask 0; " if egress is not None else ""


KERNEL_DIR = "/opt/kernel"


def build_kernel_argv(
    python: LanguageSpec,
    limits: Limits,
    paths: RunPaths,
    identity: Identity,
    *,
    kernel_dir: Path,
    socket_fd: int,
    egress: Egress | None = None,
) -> list[str]:
    """The nsjail argv of a Python kernel: the jail of a ``py`` run, living until it is stopped.

    Each run's wall clock is the host's business (it interrupts, then kills), so nsjail has no time
    limit; the kernel gets its protocol socket as fd ``socket_fd`` and its code read-only.
    """
    argv = _jail_argv(limits, paths, identity, python.env, time_limit="0", cpu_limit="inf", egress=egress)
    argv += ["--bindmount_ro", f"{kernel_dir}:{KERNEL_DIR}", "--pass_fd", str(socket_fd)]
    # Not exec'd: sh stays pid 1 of the jail, so the kernel and the user's code are never init.
    command = umask(egress) + f"{paths.venv}/bin/python -E -s {KERNEL_DIR}/kernel.py {socket_fd}"
    return [*argv, "--", "/bin/sh", "-c", command]


# --- the zygote (KERNEL_MODE=zygote) ---------------------------------------------------------------------

# What the zygote itself needs and its children never get: it builds each child's namespaces and mounts.
ZYGOTE_ALLOWED = frozenset({"mount", "umount", "move_mount", "unshare", "setns"})
ZYGOTE_SECCOMP_POLICY = (
    "ERRNO(1) { "
    + ", ".join(name for name in DENIED_SYSCALLS if name not in ZYGOTE_ALLOWED)
    + f", ioctl(fd, cmd) {{ (cmd & 0xffffffff) == {TIOCSTI:#x} }}"
    + f", socket(domain) {{ domain == {AF_VSOCK} || domain == {AF_ALG} }}"
    + " } ERRNO(38) { clone3 } DEFAULT ALLOW"
)
ZYGOTE_THREADS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def child_seccomp() -> dict[str, object]:
    """The children's filter, as data for the zygote to compile with libseccomp: the same deny-list as
    SECCOMP_POLICY (libseccomp spells umount ``umount2``)."""
    return {
        "deny": [*DENIED_SYSCALLS, "umount2"],
        "enosys": ["clone3"],
        "clone_new_flags": CLONE_NEW_FLAGS,
        "ioctl_denied": [TIOCSTI],
        "socket_families": [AF_VSOCK, AF_ALG],
    }


def kernel_env(python: LanguageSpec, paths: RunPaths, egress: Egress | None = None) -> dict[str, str]:
    """A zygote child's environment: a kernel's, plus one BLAS thread (the zygote loaded BLAS that way)."""
    env = {**BASE_ENV, **python.env}
    env = egress.env(env) if egress is not None else env
    return {**{k: v.format(venv=paths.venv) for k, v in env.items()}, **ZYGOTE_THREADS_ENV}


def build_zygote_argv(python: LanguageSpec, limits: Limits, paths: RunPaths, *, root_uid: int, slot_uid: int,
                      slots: int, kernel_dir: Path, control_fd: int, config: str,
                      egress: Egress | None = None) -> list[str]:  # fmt: skip
    """The nsjail argv of the zygote: a kernel's jail without a run directory, its root (host ``root_uid``)
    keeping capabilities in its user namespace to build its children's, and the slot uids mapped 1:1."""
    argv = [
        str(paths.nsjail),
        "--mode", "o",
        "--hostname", "sandbox",
        "--user", f"0:{root_uid}:1", "--user", f"{slot_uid}:{slot_uid}:{slots}",
        "--group", f"0:{root_uid}:1", "--group", f"{slot_uid}:{slot_uid}:{slots}",
        "--keep_caps",
        "--cwd", "/",
        "--bindmount_ro", "/usr",
        "--tmpfsmount", "/usr/local",
        "--symlink", "usr/bin:/bin", "--symlink", "usr/lib:/lib", "--symlink", "usr/lib64:/lib64",
        "--bindmount", "/dev/null", "--bindmount_ro", "/dev/urandom", "--bindmount_ro", "/dev/zero",
        "--mount", "none:/tmp:tmpfs:size=16777216",
        "--mount", "none:/dev/shm:tmpfs:size=65536",
        "--mount", "none:/mnt/data:tmpfs:size=4096",  # a mount point: each child moves its run directory here
        "--bindmount_ro", str(paths.venv),
        "--bindmount_ro", f"{kernel_dir}:{KERNEL_DIR}",
    ]  # fmt: skip
    for etc in paths.runtime_etc:
        argv += ["--bindmount_ro", etc]
    for name in ("passwd", "group", "hosts", "resolv.conf"):
        argv += ["--bindmount_ro", f"{paths.etc_dir / name}:/etc/{name}"]
    if egress is not None:  # a mount point for each child's package cache, and the CA certificates
        argv += ["--mount", f"none:{DEPS_DIR}:tmpfs:size=4096", "--bindmount_ro", CA_CERTS]
    for key, value in {**kernel_env(python, paths), "MPLCONFIGDIR": "/tmp/.mpl"}.items():
        argv += ["--env", f"{key}={value}"]
    argv += [
        "--time_limit", "0", "--rlimit_cpu", "inf", "--rlimit_as", "inf", "--rlimit_fsize", "inf",
        "--rlimit_nofile", "1024", "--rlimit_core", "0", "--max_cpus", str(limits.max_cpus),
        "--seccomp_string", ZYGOTE_SECCOMP_POLICY,
        "--pass_fd", str(control_fd),
    ]  # fmt: skip
    if limits.network:
        argv.append("--disable_clone_newnet")
    command = [f"{paths.venv}/bin/python", "-E", "-s", f"{KERNEL_DIR}/zygote.py", str(control_fd), config]
    return [*argv, "--", *command]
