"""Building the execution layer from the settings: lock, layout, cgroups, languages, runner, executor."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from interpreter.errors import SettingsError
from interpreter.execution.executor import Executor, default_concurrency
from interpreter.execution.launcher import LauncherConfig, LauncherPool
from interpreter.execution.runner import Runner, RunnerConfig
from interpreter.health import CheckResult
from interpreter.resources import sandboxes_dir
from interpreter.settings import Settings
from sandboxes.host import (
    HostError,
    HostLayout,
    existing_runtime_etc,
    prepare_cgroups,
    prepare_layout,
    remove_cgroup_parents,
    take_instance_lock,
)
from sandboxes.jail import Cgroups, Identity
from sandboxes.languages import LanguageError, LanguageSpec, load_languages
from sandboxes.nsjail import locate_nsjail
from supervisors.reaper import ReaperConfig

MIB = 1024 * 1024


@dataclass(frozen=True)
class Execution:
    layout: HostLayout
    cgroups: Cgroups | None
    languages: Mapping[str, LanguageSpec]
    runner: Runner
    executor: Executor
    reaper: ReaperConfig


@contextmanager
def open_execution(settings: Settings) -> Iterator[Execution]:
    """Prepare the host for jails and hold the instance lock until the block ends.

    Raises:
        SettingsError: a language file is invalid, nsjail is missing, or another instance holds the lock.
    """
    try:
        languages = load_languages(sandboxes_dir() / "languages")
    except LanguageError as exc:
        raise SettingsError(f"languages: {exc}") from None
    try:
        nsjail = locate_nsjail(settings.nsjail_binary)
    except FileNotFoundError as exc:
        raise SettingsError(f"NSJAIL_BINARY: {exc}") from None
    layout = HostLayout.under(settings.sandbox_base_dir)
    identity = Identity(settings.sandbox_uid, settings.sandbox_uid)
    try:
        prepare_layout(layout, identity.uid, identity.gid)
        lock_fd = take_instance_lock(layout.lock)
    except HostError as exc:
        raise SettingsError(f"SANDBOX_BASE_DIR: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"SANDBOX_BASE_DIR: cannot prepare {layout.base}: {exc.strerror}") from None
    try:
        cgroups = prepare_cgroups(layout.base)
        concurrency = default_concurrency(settings.max_concurrent_runs, os.cpu_count())
        launchers = LauncherPool(
            LauncherConfig(layout, identity, cgroups, settings.max_run_dir_mib * MIB, settings.max_memory_mib * MIB),
            size=concurrency,
            active=set(),
        )
        runner = Runner(
            RunnerConfig(
                nsjail=nsjail,
                layout=layout,
                venv=settings.sandbox_venv,
                runtime_etc=existing_runtime_etc(),
                identity=identity,
                memory_bytes=settings.max_memory_mib * MIB,
                tmp_bytes=settings.sandbox_tmpfs_size_mib * MIB,
                fsize_mib=settings.max_file_size_mib,
                output_cap_bytes=int(settings.max_output_mib * MIB),
                network=not settings.enable_network_isolation,
            ),
            launchers,
        )
        executor = Executor(
            runner,
            max_concurrent=concurrency,
            queue_size=settings.run_queue_size,
        )
        reaper = ReaperConfig(
            runs_dir=layout.runs, cgroups=cgroups, interval_s=settings.sandbox_cleanup_interval_min * 60
        )
        yield Execution(layout, cgroups, languages, runner, executor, reaper)
        if cgroups is not None:
            remove_cgroup_parents(cgroups)
    finally:
        os.close(lock_fd)


async def sandbox_check(execution: Execution) -> CheckResult:
    """Health: cgroups available (limits enforced) and how busy the executor is."""
    stats = execution.executor.statistics()
    details = {
        **stats,
        "cgroups": f"v{execution.cgroups.version}" if execution.cgroups else None,
        "languages": sorted(execution.languages),
        "prepared": execution.runner.launchers.prepared(),
    }
    if execution.cgroups is None:
        return CheckResult("unhealthy", details, error="no usable cgroups: memory and pids limits cannot be enforced")
    if stats["waiting"] >= stats["queue_size"] > 0:
        return CheckResult("degraded", details, error="the run queue is full")
    return CheckResult("healthy", details)
