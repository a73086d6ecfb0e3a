"""cgroup detection: v1 or v2, told apart by the filesystem type of the cgroup root itself.

A hybrid host (v1 controllers plus a cgroup2 mount at ``unified/``) is v1: only the type of the
root mount counts (DESIGN §5). Pure functions over a mount table, so tests can hand in a fake one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CgroupInfo:
    version: int | None  # 1, 2, or None when there is no cgroup filesystem
    controllers: frozenset[str] = field(default_factory=frozenset)
    parent: Path | None = None  # where per-run cgroups are created (v1: the memory hierarchy)
    writable_parent: bool = False


def _mounts(mounts_file: Path) -> list[tuple[str, str, str]]:
    """(mount point, fs type, options) of every line of a /proc/*/mounts file."""
    entries = []
    for line in mounts_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            entries.append((parts[1], parts[2], parts[3]))
    return entries


def detect_cgroups(root: Path = Path("/sys/fs/cgroup"), mounts_file: Path = Path("/proc/self/mounts")) -> CgroupInfo:
    entries = _mounts(mounts_file)
    root_type = next((fstype for point, fstype, _ in reversed(entries) if point == str(root)), None)
    if root_type == "cgroup2":
        controllers_file = root / "cgroup.controllers"
        controllers = frozenset(controllers_file.read_text().split()) if controllers_file.is_file() else frozenset()
        return CgroupInfo(2, controllers, root, os.access(root, os.W_OK))
    v1 = {
        Path(point).name
        for point, fstype, options in entries
        if fstype == "cgroup" and Path(point).parent == root
        for option in options.split(",")
        if option == Path(point).name
    }
    if not v1:
        return CgroupInfo(None)
    parent = root / "memory"
    writable = all(os.access(root / c, os.W_OK) for c in ("memory", "pids") if c in v1)
    return CgroupInfo(1, frozenset(v1), parent, writable and "memory" in v1)
