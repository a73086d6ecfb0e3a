"""The sandbox reaper: leftovers of runs that did not clean up after themselves (a crash, a kill -9).

It touches only its own base directory and its own cgroup parent, which is also how it finds a
crashed predecessor's leftovers: run directories nobody is using, and nsjail cgroups whose nsjail
is dead or is not our child. Leftovers are found by cgroup and run directory, never by uid or name.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from sandboxes.host import remove_run_dir
from sandboxes.jail import Cgroups

log = logging.getLogger("interpreter.reaper")


@dataclass(frozen=True)
class ReaperConfig:
    runs_dir: Path
    cgroups: Cgroups | None
    interval_s: float


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields we want follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cgroup_dirs(cgroups: Cgroups) -> list[Path]:
    if cgroups.version == 2:
        parents = [cgroups.root / cgroups.parent]
    else:
        parents = [cgroups.root / controller / cgroups.parent for controller in ("memory", "pids")]
    return [child for parent in parents if parent.is_dir() for child in parent.iterdir() if child.is_dir()]


def _kill_members(cgroup: Path) -> None:
    try:
        members = (cgroup / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in members:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            continue


def sweep(config: ReaperConfig, is_active: Callable[[Path], bool], *, me: int | None = None) -> dict[str, int]:
    """One pass; returns what it removed. Blocking (filesystem work): run it in a thread.

    ``is_active`` is asked per directory, at that moment: a runner registers a run directory before
    creating it, so a run that starts during the sweep is never taken for a leftover.
    """
    me = os.getpid() if me is None else me
    removed = {"run_dirs": 0, "cgroups": 0, "orphan_jails": 0}
    if config.runs_dir.is_dir():
        for entry in config.runs_dir.iterdir():
            if not is_active(entry):
                remove_run_dir(entry)
                removed["run_dirs"] += 1
    if config.cgroups is None:
        return removed
    for cgroup in _cgroup_dirs(config.cgroups):
        name = cgroup.name
        if not name.startswith("NSJAIL."):
            continue
        pid = int(name.removeprefix("NSJAIL.")) if name.removeprefix("NSJAIL.").isdigit() else None
        parent = _parent_pid(pid) if pid is not None else None
        if parent == me:
            continue  # a live run of ours
        if parent is not None and pid is not None:
            # An nsjail of a crashed predecessor, still running its jail: stop it (it removes its cgroup).
            os.kill(pid, signal.SIGKILL)
            removed["orphan_jails"] += 1
        _kill_members(cgroup)
        try:
            cgroup.rmdir()
            removed["cgroups"] += 1
        except OSError:
            continue  # members still exiting: the next pass gets it
    return removed


async def run(
    config: ReaperConfig,
    is_active: Callable[[Path], bool],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Sweep at start (before ready, so a predecessor's leftovers are gone before we serve), then every interval."""
    limiter = trio.CapacityLimiter(1)
    while True:
        removed = await trio.to_thread.run_sync(sweep, config, is_active, limiter=limiter)
        if any(removed.values()):
            log.info("reaped sandbox leftovers", extra={"fields": removed})
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        await trio.sleep(config.interval_s)
