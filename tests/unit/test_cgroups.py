"""cgroup detection against fake sysfs trees (cgroup v2 cannot be exercised on these machines)."""

from __future__ import annotations

from pathlib import Path

from sandboxes.cgroups import detect_cgroups
from sandboxes.host import cgroup_parent_name, create_run_cgroup, oom_kills, prepare_cgroups

V1_HYBRID = """tmpfs {root} tmpfs rw,relatime,mode=755 0 0
cgroup {root}/cpu cgroup rw,relatime,cpu 0 0
cgroup {root}/memory cgroup rw,relatime,memory 0 0
cgroup {root}/pids cgroup rw,relatime,pids 0 0
cgroup {root}/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 {root}/unified cgroup2 rw,relatime 0 0
"""


def fake(tmp_path: Path, table: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(table.format(root=root))
    return root, mounts


def test_hybrid_host_is_v1_not_v2(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, V1_HYBRID)
    for name in ("cpu", "memory", "pids", "systemd", "unified"):
        (root / name).mkdir()
    info = detect_cgroups(root, mounts)
    assert info.version == 1
    assert info.controllers == {"cpu", "memory", "pids"}
    assert info.parent == root / "memory"
    assert info.writable_parent


def test_unified_v2(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, "cgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    info = detect_cgroups(root, mounts)
    assert info.version == 2
    assert {"memory", "pids"} <= info.controllers
    assert info.parent == root


def test_no_cgroups(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, "proc /proc proc rw 0 0\n")
    assert detect_cgroups(root, mounts).version is None


def test_this_machine_is_detected() -> None:
    info = detect_cgroups()
    assert info.version in (1, 2)


def test_v2_parent_is_created_with_controllers_delegated(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, "cgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    cgroups = prepare_cgroups(Path("/srv/sandboxes"), root, mounts)
    assert cgroups is not None
    assert cgroups.version == 2
    assert cgroups.parent == cgroup_parent_name(Path("/srv/sandboxes"))
    assert (root / cgroups.parent).is_dir()
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_v1_parents_are_created_per_controller(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, V1_HYBRID)
    for name in ("cpu", "memory", "pids", "systemd", "unified"):
        (root / name).mkdir()
    cgroups = prepare_cgroups(Path("/srv/a"), root, mounts)
    assert cgroups is not None
    assert cgroups.version == 1
    assert (root / "memory" / cgroups.parent).is_dir()
    assert (root / "pids" / cgroups.parent).is_dir()
    assert cgroups.swap_accounting is False  # no memory.memsw.* in the fake tree


def test_two_base_dirs_get_two_cgroup_parents() -> None:
    assert cgroup_parent_name(Path("/srv/a")) != cgroup_parent_name(Path("/srv/b"))
    assert cgroup_parent_name(Path("/srv/a")) == cgroup_parent_name(Path("/srv/a"))


def test_run_cgroup_v1_carries_the_limits(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, V1_HYBRID)
    for name in ("cpu", "memory", "pids", "systemd", "unified"):
        (root / name).mkdir()
    cgroups = prepare_cgroups(Path("/srv/a"), root, mounts)
    assert cgroups is not None
    run = create_run_cgroup(cgroups, "run-1", 256 * 2**20, 64)
    memory, pids = root / "memory" / cgroups.parent / "run-1", root / "pids" / cgroups.parent / "run-1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(256 * 2**20)
    assert (pids / "pids.max").read_text() == "64"
    assert run.procs_files == (memory / "cgroup.procs", pids / "cgroup.procs")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert oom_kills(run) == 2


def test_run_cgroup_v2_carries_the_limits(tmp_path: Path) -> None:
    root, mounts = fake(tmp_path, "cgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    (root / "cgroup.controllers").write_text("memory pids\n")
    cgroups = prepare_cgroups(Path("/srv/b"), root, mounts)
    assert cgroups is not None
    run = create_run_cgroup(cgroups, "run-2", 128 * 2**20, 32)
    directory = root / cgroups.parent / "run-2"
    assert (directory / "memory.max").read_text() == str(128 * 2**20)
    assert (directory / "pids.max").read_text() == "32"
    assert run.procs_files == (directory / "cgroup.procs",)
    assert oom_kills(run) == 0  # no memory.events yet
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert oom_kills(run) == 1
