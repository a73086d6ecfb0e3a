"""The sandbox reaper: leftovers of runs that did not clean up after themselves (a crash, a kill -9).

It touches only its own base directory and its own cgroup parent, which is also how it finds a
crashed predecessor's leftovers: run directories and run cgroups that no run of ours is using.
Leftovers are found by cgroup and run directory, never by uid or process name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from sandboxes.host import remove_cgroup_tree, remove_run_dir
from sandboxes.jail import Cgroups

log = logging.getLogger("interpreter.reaper")


@dataclass(frozen=True)
class ReaperConfig:
    runs_dir: Path
    cgroups: Cgroups | None
    interval_s: float


def _run_cgroups(cgroups: Cgroups) -> list[Path]:
    """Our per-run cgroups (``run-<id>``) in every hierarchy we use."""
    if cgroups.version == 2:
        parents = [cgroups.root / cgroups.parent]
    else:
        parents = [cgroups.root / controller / cgroups.parent for controller in ("memory", "pids")]
    return [child for parent in parents if parent.is_dir() for child in parent.iterdir() if child.is_dir()]


def sweep(config: ReaperConfig, is_active: Callable[[Path], bool]) -> dict[str, int]:
    """One pass; returns what it removed. Blocking (filesystem work): run it in a thread.

    ``is_active`` is asked per run, at that moment: a runner registers a run directory before
    creating it or its cgroup, so a run that starts during the sweep is never taken for a leftover.
    """
    removed = {"run_dirs": 0, "cgroups": 0}
    if config.runs_dir.is_dir():
        for entry in config.runs_dir.iterdir():
            if not is_active(entry):
                remove_run_dir(entry)
                removed["run_dirs"] += 1
    if config.cgroups is None:
        return removed
    for run_cgroup in _run_cgroups(config.cgroups):
        if is_active(config.runs_dir / run_cgroup.name.removeprefix("run-")):
            continue
        # A crashed predecessor's run: its nsjail and jail are members; they are killed, then it goes.
        if remove_cgroup_tree(run_cgroup):
            removed["cgroups"] += 1
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
