"""build_argv is pure: its output for a table of inputs says everything about the jail's shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from interpreter.resources import sandboxes_dir
from sandboxes.jail import (
    RUNTIME_ETC,
    SECCOMP_POLICY,
    Egress,
    Identity,
    Limits,
    RunPaths,
    build_argv,
    heap_mib,
)
from sandboxes.languages import LanguageSpec, java_main_class, load_languages

LANGUAGES = load_languages(sandboxes_dir() / "languages")
LIMITS = Limits(wall_s=30, memory_bytes=512 * 2**20, pids=64, fsize_mib=100, tmp_bytes=100 * 2**20)
PATHS = RunPaths(
    nsjail=Path("/opt/nsjail"),
    run_dir=Path("/srv/sb/runs/abc"),
    etc_dir=Path("/srv/sb/.runtime/etc"),
    venv=Path("/opt/venv"),
    runtime_etc=("/etc/php", "/etc/R"),
    log_fd=7,
)
ME = Identity(1001, 1001)


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, item in enumerate(argv[:-1]) if item == flag and "--" not in argv[:i]]


def jail_part(argv: list[str]) -> list[str]:
    return argv[: argv.index("--")]


def argv_for(code: str = "py", **overrides: object) -> list[str]:
    options: dict[str, object] = {"source": "code.x", "args": ()}
    options.update(overrides)
    return build_argv(LANGUAGES[code], LIMITS, PATHS, ME, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", sorted(LANGUAGES))
def test_every_language_gets_the_same_jail(code: str) -> None:
    argv = argv_for(code)
    jail = jail_part(argv)
    assert argv[0] == "/opt/nsjail"
    assert flag_values(jail, "--user") == ["1001:1001"]
    assert flag_values(jail, "--group") == ["1001:1001"]
    assert "--disable_clone_newnet" not in jail  # own network namespace: only lo
    for disabled in ("--disable_clone_newuser", "--disable_clone_newpid", "--disable_clone_newns",
                     "--disable_clone_newipc", "--disable_clone_newuts", "--disable_no_new_privs", "--keep_caps",
                     "--disable_proc", "--proc_rw"):  # fmt: skip
        assert disabled not in jail
    assert flag_values(jail, "--seccomp_string") == [SECCOMP_POLICY]
    assert argv[argv.index("--") + 1 : argv.index("--") + 3] == ["/bin/sh", "-c"]


def test_mounts_are_exactly_the_runtime_and_the_run_dir() -> None:
    jail = jail_part(argv_for())
    read_only = flag_values(jail, "--bindmount_ro")
    writable = flag_values(jail, "--bindmount")
    assert read_only[0] == "/usr"
    assert "/opt/venv" in read_only
    assert "/etc/php" in read_only
    assert "/etc/R" in read_only
    assert sorted(r for r in read_only if r.startswith("/srv/sb/.runtime/etc/")) == [
        f"/srv/sb/.runtime/etc/{name}:/etc/{name}" for name in ("group", "hosts", "passwd", "resolv.conf")
    ]
    assert writable == ["/dev/null", "/srv/sb/runs/abc:/mnt/data"]
    sources = [spec.split(":")[0] for spec in read_only + writable]
    for forbidden in ("/home", "/root", "/var", "/run", "/etc/shadow", "/etc/ssh", "/etc/ssl", "/proc", "/sys"):
        assert not any(source == forbidden or source.startswith(forbidden + "/") for source in sources)
    assert set(read_only) - {"/usr", "/opt/venv", "/dev/urandom", "/dev/zero"} - {
        r for r in read_only if r.startswith("/srv/sb/.runtime/etc/")
    } <= set(RUNTIME_ETC)
    # /usr/local hidden behind a tmpfs, after /usr; /tmp and /dev/shm private tmpfs
    assert jail.index("/usr/local") > jail.index("/usr")
    assert flag_values(jail, "--mount") == [f"none:/tmp:tmpfs:size={100 * 2**20}", f"none:/dev/shm:tmpfs:size={2**26}"]
    assert flag_values(jail, "--cwd") == ["/mnt/data"]


def test_limits() -> None:
    jail = jail_part(argv_for())
    assert flag_values(jail, "--time_limit") == ["32"]  # a backstop: the runner's own timer says 30
    assert flag_values(jail, "--rlimit_cpu") == ["60"]  # wall time multiplied by max_cpus
    assert flag_values(jail, "--rlimit_fsize") == ["100"]
    assert flag_values(jail, "--rlimit_nofile") == ["256"]
    assert flag_values(jail, "--rlimit_as") == ["inf"]
    assert flag_values(jail, "--rlimit_core") == ["0"]
    assert flag_values(jail, "--max_cpus") == ["2"]
    assert flag_values(jail, "--log_fd") == ["7"]


def test_limits_are_not_nsjails_business() -> None:
    # Memory and pids limits live on the run's own cgroup (launcher.py), which nsjail is started in.
    assert not any(flag.startswith("--cgroup") for flag in argv_for("bash", source="code.sh"))


def test_network_isolation_off_shares_the_host_network() -> None:
    limits = Limits(wall_s=5, memory_bytes=2**28, pids=32, fsize_mib=1, tmp_bytes=2**20, network=True)
    jail = jail_part(build_argv(LANGUAGES["bash"], limits, PATHS, ME, source="code.sh"))
    assert "--disable_clone_newnet" in jail


def test_args_are_positional_parameters_never_shell_text() -> None:
    hostile = ("a b", "$(reboot)", "; rm -rf /", "'\"")
    argv = argv_for("bash", source="code.sh", args=hostile)
    tail = argv[argv.index("--") + 1 :]
    assert tail[:2] == ["/bin/sh", "-c"]
    assert tail[3] == "sh"
    assert tuple(tail[4:]) == hostile
    assert '"$@"' in tail[2]
    assert "reboot" not in tail[2]


def test_command_placeholders() -> None:
    java = argv_for("java", source="Solver.java", main="Solver")
    command = java[java.index("--") + 3]
    assert "javac" in command
    assert "'Solver.java'" in command  # quoted: Java identifiers may contain $
    assert "-cp /tmp/classes 'Solver'" in command
    assert f"-Xmx{heap_mib(LIMITS)}m" in command
    python = argv_for("py", source="code.py")
    assert "/opt/venv/bin/python" in python[python.index("--") + 3]


def test_environment_is_a_whitelist() -> None:
    env = dict(item.split("=", 1) for item in flag_values(jail_part(argv_for("go")), "--env"))
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == "/tmp"
    assert env["LANG"] == "C.UTF-8"
    assert env["GOCACHE"].startswith("/tmp/")
    assert not any("KEY" in name or "SECRET" in name or "TOKEN" in name for name in env)


def test_seccomp_policy_covers_the_design_list() -> None:
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "unshare", "setns", "pivot_root",
                 "chroot", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
                 "init_module", "finit_module", "kexec_load", "io_uring_setup", "kcmp", "pidfd_getfd"):  # fmt: skip
        assert f" {name}," in SECCOMP_POLICY or f"{{ {name}," in SECCOMP_POLICY
    assert "ERRNO(38) { clone3 }" in SECCOMP_POLICY
    assert "clone(flags) { (flags & 0x7e020080) != 0 }" in SECCOMP_POLICY
    assert "0x5412" in SECCOMP_POLICY  # TIOCSTI
    assert SECCOMP_POLICY.endswith("DEFAULT ALLOW")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("public class Solver { public static void main(String[] a) {} }", ("Solver", "Solver")),
        ("class Helper {}\npublic final class App { }", ("App", "App")),
        ("// public class Fake\nclass Main { public static void main(String[] a) {} }", ("Main", "Main")),
        ('class A { String s = "public class B"; }', ("A", "A")),
        ("public record Point(int x, int y) {}", ("Point", "Point")),
        ("interface X {}", ("X", "X")),
        ("System.out.println(1);", ("Main", "Main")),
        ("class Node { int v; }\nclass Solution { public static void main(String[] a) {} }", ("Solution", "Solution")),
        ("public class Outer { static class Inner { public static void main(String[] a) {} } }", ("Outer", "Outer")),
        ("package demo.app;\npublic class App { public static void main(String[] a) {} }", ("App", "demo.app.App")),
        ("public class Lib {}\nclass Runner { static void main(String[] a) {} }", ("Lib", "Runner")),
    ],
)
def test_java_main_class(source: str, expected: tuple[str, str]) -> None:
    assert java_main_class(source) == expected


def test_invalid_language_files_stop_the_start(tmp_path: Path) -> None:
    from sandboxes.languages import LanguageError

    (tmp_path / "xx.toml").write_text(
        'name = "X"\nsource = "../evil"\ncommand = "true"\nsmoke = "s"\nsmoke_expect = ""\n'
        '[runtime]\nbinary = "/bin/true"\nversion = ["/bin/true"]\n'
    )
    with pytest.raises(LanguageError, match=r"xx\.toml"):
        load_languages(tmp_path)
    (tmp_path / "xx.toml").write_text('name = "X"\nunknown_field = 1\n')
    with pytest.raises(LanguageError, match=r"xx\.toml"):
        load_languages(tmp_path)


def test_all_thirteen_languages_are_defined() -> None:
    assert sorted(LANGUAGES) == sorted(
        ["py", "js", "ts", "go", "java", "c", "cpp", "php", "rs", "r", "f90", "d", "bash"]
    )
    assert all(isinstance(spec, LanguageSpec) for spec in LANGUAGES.values())


EGRESS = Egress(port=18443, registries_env=(("PIP_INDEX_URL", "https://pypi.org/simple"),), deps=Path("/srv/deps/k1"))


@pytest.mark.parametrize("code", ["py", "bash", "js", "go"])
def test_with_egress_a_jail_joins_the_prepared_namespace_and_gets_its_principals_cache(code: str) -> None:
    argv = argv_for(code, egress=EGRESS)
    jail = jail_part(argv)
    assert "--disable_clone_newnet" in jail  # the namespace the launcher was started in: lo + the proxy
    assert "/srv/deps/k1:/opt/skill-deps" in flag_values(jail, "--bindmount")
    assert "/etc/ssl/certs" in flag_values(jail, "--bindmount_ro")
    env = dict(item.split("=", 1) for item in flag_values(jail, "--env"))
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:18443"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert env["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert env["PIP_TARGET"] == "/opt/skill-deps/python"
    assert env["PYTHONPATH"].split(":")[-1] == "/opt/skill-deps/python"
    assert env["NPM_CONFIG_PREFIX"] == "/opt/skill-deps/node"
    assert env["CARGO_HOME"] == "/opt/skill-deps/cargo"
    assert env["GOMODCACHE"] == "/opt/skill-deps/go/pkg/mod"
    assert "-modcacherw" in env["GOFLAGS"].split()
    assert env["PATH"].startswith("/opt/skill-deps/python/bin:")
    assert env["PATH"].endswith(":/opt/venv/bin")
    assert argv[argv.index("-c") + 1].startswith("umask 0; ")  # files for every uid of the principal's jails


def test_without_egress_nothing_of_it_is_there() -> None:
    argv = argv_for("py")
    env = dict(item.split("=", 1) for item in flag_values(jail_part(argv), "--env"))
    assert not {"HTTPS_PROXY", "https_proxy", "PIP_TARGET", "NPM_CONFIG_PREFIX"} & set(env)
    assert not any("/opt/skill-deps" in value for value in flag_values(jail_part(argv), "--bindmount"))
    assert "umask" not in argv[argv.index("-c") + 1]


def test_a_brace_in_a_registry_url_is_kept_as_it_is() -> None:
    odd = Egress(port=18443, registries_env=(("PIP_INDEX_URL", "https://x.example/{simple}"),), deps=Path("/d"))
    env = dict(item.split("=", 1) for item in flag_values(jail_part(argv_for("py", egress=odd)), "--env"))
    assert env["PIP_INDEX_URL"] == "https://x.example/{simple}"
