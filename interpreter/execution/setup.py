"""Building the execution layer from the settings: lock, layout, cgroups, languages, runner, executor."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

from interpreter.egress.service import SandboxNetwork
from interpreter.errors import SettingsError
from interpreter.execution.executor import Executor, default_concurrency
from interpreter.execution.kernel_pool import KernelPool, PoolConfig
from interpreter.execution.kernels import KernelConfig
from interpreter.execution.launcher import LauncherConfig, LauncherPool
from interpreter.execution.runner import Runner, RunnerConfig
from interpreter.execution.zygote import Zygote, ZygoteConfig
from interpreter.execution.zygote import supported as zygote_supported
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
from sandboxes.jail import Cgroups, Identity, RunPaths
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
    kernels: KernelPool | None  # None when the py language is missing
    zygote: Zygote | None = None  # KERNEL_MODE resolved to zygote
    kernel_mode: tuple[str, str] = ("nsjail", "")  # (mode, why)


@contextmanager
def open_execution(settings: Settings, network: SandboxNetwork | None = None) -> Iterator[Execution]:
    """Prepare the host for jails and hold the instance lock until the block ends (``network``: the sandbox
    network, ENABLE_SANDBOX_NETWORK).

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
    pool = pool_config(settings)
    if network is not None:  # a kernel starts with its principal's package cache: none can be made ahead
        pool = replace(pool, size=0)
    try:
        uids = [identity.uid] + [pool.base_uid + 2 + slot for slot in range(pool.slots)]
        prepare_layout(layout, uids, kernel_source=sandboxes_dir() / "kernel")
        if network is not None:
            network.deps.restrict_to(uids)
        lock_fd = take_instance_lock(layout.lock)
    except HostError as exc:
        raise SettingsError(f"SANDBOX_BASE_DIR: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"SANDBOX_BASE_DIR: cannot prepare {layout.base}: {exc.strerror}") from None
    try:
        cgroups = prepare_cgroups(layout.base)
        concurrency = default_concurrency(settings.max_concurrent_runs, os.cpu_count())
        launchers = LauncherPool(
            LauncherConfig(
                layout,
                identity,
                cgroups,
                settings.max_run_dir_mib * MIB,
                settings.max_memory_mib * MIB,
                egress_port=network.jail.port if network is not None else None,
            ),
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
                egress=network,
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
        kernels, zygote = None, None
        mode = kernel_mode(settings)
        if mode[0] == "zygote":
            # The replenish interval spreads out cold starts (~0.5 s of CPU each); a zygote kernel costs a
            # fork, so the pool refills as soon as a kernel is taken.
            pool = replace(pool, spacing_s=0.0)
        if "py" in languages:
            kernel_limits = runner.limits_for(languages["py"], settings.max_execution_time_s)
            kernel_paths = RunPaths(nsjail=nsjail, run_dir=layout.runs, etc_dir=layout.etc, venv=settings.sandbox_venv,
                                    runtime_etc=runner.config.runtime_etc)  # fmt: skip
            if mode[0] == "zygote":
                zygote = Zygote(ZygoteConfig(
                    python=languages["py"], limits=kernel_limits, paths=kernel_paths, kernel_dir=layout.kernel,
                    base_uid=settings.sandbox_uid, slots=pool.slots, rotate_sessions=settings.zygote_rotate_sessions,
                    rotate_s=settings.zygote_rotate_min * 60, start_timeout_s=settings.repl_warmup_timeout_s,
                    egress=network.jail if network is not None else None,
                ))  # fmt: skip
            kernel_config = KernelConfig(
                launcher=launchers.config,
                paths=kernel_paths,
                python=languages["py"],
                kernel_dir=layout.kernel,
                limits=kernel_limits,
                output_cap_bytes=runner.config.output_cap_bytes,
                start_timeout_s=settings.repl_warmup_timeout_s,
                state_max_bytes=state_max_bytes(settings),
                zygote=zygote,
                zygote_fallback=settings.kernel_mode == "auto",
                egress=network,
            )
            kernels = KernelPool(kernel_config, pool, launchers.active)
        yield Execution(layout, cgroups, languages, runner, executor, reaper, kernels, zygote, mode)
        if cgroups is not None:
            remove_cgroup_parents(cgroups)
    finally:
        os.close(lock_fd)


def kernel_mode(settings: Settings) -> tuple[str, str]:
    """How Python kernels start (KERNEL_MODE), and why.

    Raises:
        SettingsError: KERNEL_MODE=zygote on a host that cannot run zygote kernels.
    """
    if settings.kernel_mode == "nsjail":
        return "nsjail", "KERNEL_MODE=nsjail: a fresh nsjail per kernel (maximum isolation, ~0.5 s per start)"
    missing = zygote_supported()
    if missing is None:
        return "zygote", (f"KERNEL_MODE={settings.kernel_mode}: kernels are forked from a pre-imported zygote "
                          "(a few ms per start)")  # fmt: skip
    if settings.kernel_mode == "zygote":
        raise SettingsError(f"KERNEL_MODE=zygote: {missing}")
    return "nsjail", f"KERNEL_MODE=auto: a fresh nsjail per kernel, because {missing}"


def state_max_bytes(settings: Settings) -> int:
    """The largest checkpoint a kernel may hand over (beyond STATE_MAX_REDIS_SIZE_MB it goes to blobs)."""
    return int(max(256, settings.state_max_redis_size_mib) * MIB)


def pool_config(settings: Settings) -> PoolConfig:
    return PoolConfig(
        size=settings.sandbox_pool_py if settings.sandbox_pool_enabled else 0,
        batch=settings.sandbox_pool_parallel_batch,
        spacing_s=settings.sandbox_pool_replenish_interval_s,
        exhaustion_trigger=settings.sandbox_pool_exhaustion_trigger,
        warmup_on_start=settings.sandbox_pool_warmup_on_startup,
        max_live=settings.max_live_kernels,
        memory_budget_bytes=settings.kernel_memory_budget_mib * MIB,
        idle_ttl_s=settings.sandbox_ttl_min * 60,
        base_uid=settings.sandbox_uid,
        keep_live=settings.repl_enabled,
        # One per run slot and as many again: a burst of new sessions never waits for evictions to finish.
        spare=2 * default_concurrency(settings.max_concurrent_runs, os.cpu_count()),
    )


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
