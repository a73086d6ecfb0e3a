"""The composition root: the only module that knows every component (DESIGN §2, STYLE §3).

Lexical nesting is the shutdown order: HTTP drains first (within SHUTDOWN_GRACE_SECONDS), then the
services are cancelled with bounded cleanup, then the stores close.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path

import trio
import trio_asyncio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Blueprint

from interpreter import __version__
from interpreter.api.app import AppDeps, create_app
from interpreter.api.execute import file_limits
from interpreter.auth.failures import FailureLimiter, parse_networks
from interpreter.auth.jwt import refresh_forever, verifier_from_settings
from interpreter.auth.keys import KeyAuthenticator
from interpreter.auth.managed import ManagedKeys
from interpreter.egress.proxy import Resolver, system_resolver
from interpreter.egress.service import SandboxNetwork, open_network
from interpreter.errors import SettingsError
from interpreter.execution.programmatic import Programmatic
from interpreter.execution.python import PythonRuns
from interpreter.execution.setup import Execution, open_execution, sandbox_check, state_max_bytes
from interpreter.execution.state import StateStore
from interpreter.files.catalog import Catalog
from interpreter.health import CheckResult, HealthRegistry
from interpreter.metrics import Gauge
from interpreter.settings import DEFAULT_API_KEY, LOOPBACK_HOSTS, Settings
from interpreter.stores.open import Stores, open_stores, register_store_checks
from interpreter.stores.protocols import StoreError
from sandboxes.nsjail import locate_nsjail
from supervisors import reaper, session_cleanup, state_archiver
from supervisors.sd_notify import Notifier, run_watchdog
from supervisors.supervise import ServiceBoard, supervise

log = logging.getLogger("interpreter")
MIB = 1024 * 1024

ShutdownTrigger = Callable[[], Awaitable[None]]


async def wait_for_signal() -> None:
    """Returns on the first SIGTERM or SIGINT: the start of a graceful shutdown."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutdown requested", extra={"fields": {"signal": signal.Signals(signum).name}})
            return


def startup_warnings(settings: Settings) -> list[str]:
    """What an operator must hear about at start (and sees again in /health/detailed)."""
    warnings = []
    exposed = settings.api_host not in LOOPBACK_HOSTS
    if settings.auth_enabled and DEFAULT_API_KEY in settings.all_api_keys and exposed:
        warnings.append(
            f"the default API key ({DEFAULT_API_KEY!r}) is accepted on a non-loopback bind: anyone who knows "
            "the guide can run code here; set API_KEY"
        )
    if settings.auth_enabled and any(len(key) < 16 for key in settings.all_api_keys):
        warnings.append("an API key is shorter than 16 characters")
    if not settings.auth_enabled and exposed:
        warnings.append("AUTH_ENABLED=false on a non-loopback bind: user routes are open to anyone who can connect")
    if not settings.enable_network_isolation:
        warnings.append("ENABLE_NETWORK_ISOLATION=false: sandboxes share the host's network")
    if settings.api_reload:
        warnings.append("API_RELOAD is ignored: a binary does not reload")
    return warnings


def hypercorn_config(settings: Settings) -> HyperConfig:
    """Set attributes one by one (never from_mapping, which drops unknown keys silently)."""
    config = HyperConfig()
    host = settings.api_host
    config.bind = [
        f"[{host}]:{settings.port}" if ":" in host and not host.startswith("[") else f"{host}:{settings.port}"
    ]
    config.graceful_timeout = settings.shutdown_grace_s
    config.keep_alive_timeout = 75  # above the idle timeouts of common proxies and Node's keep-alive agents
    config.include_server_header = False
    config.websocket_max_message_size = settings.max_request_json_bytes
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = logging.getLogger("interpreter.access") if settings.enable_access_logs else None
    # %(r)s is "METHOD path PROTOCOL" without the query string: keys in URLs never reach the log.
    config.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(D)sus'
    if settings.https_enabled:
        for label, path in (
            ("SSL_CERT_FILE", settings.ssl_cert_path),
            ("SSL_KEY_FILE", settings.ssl_key_path),
            ("SSL_CA_CERTS", settings.ssl_ca_path),
        ):
            if path is not None and not path.is_file():
                raise SettingsError(f"{label}: HTTPS is enabled but {path} is not a readable file")
        config.certfile = str(settings.ssl_cert_path)
        config.keyfile = str(settings.ssl_key_path)
        if settings.ssl_ca_path is not None:
            config.ca_certs = str(settings.ssl_ca_path)
    return config


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def register_base_checks(health: HealthRegistry, settings: Settings, board: ServiceBoard, warnings: list[str]) -> None:
    """The checks this layer owns; sandboxes, stores and kernels register their own."""

    async def nsjail_check() -> CheckResult:
        try:
            binary = locate_nsjail(settings.nsjail_binary)
        except FileNotFoundError:
            return CheckResult("unhealthy", error="nsjail binary not found")
        if not os.access(binary, os.X_OK):
            return CheckResult("unhealthy", error="nsjail binary is not executable")
        details = {"bundled": settings.nsjail_binary == "nsjail"}
        if not _writable_dir(settings.sandbox_base_dir):
            return CheckResult("degraded", details, error="SANDBOX_BASE_DIR is missing or not writable")
        return CheckResult("healthy", details)

    async def services_check() -> CheckResult:
        stats = board.statistics()
        return CheckResult("healthy" if board.healthy() else "degraded", {"services": stats})

    async def security_check() -> CheckResult:
        details = {
            "auth_enabled": settings.auth_enabled,
            "network_isolation": settings.enable_network_isolation,
            "https": settings.https_enabled,
        }
        if warnings:
            return CheckResult("degraded", {**details, "warnings": warnings})
        return CheckResult("healthy", details)

    health.register("nsjail", nsjail_check)
    health.register("services", services_check, required=False)
    health.register("security", security_check, required=False)


def python_runs(settings: Settings, execution: Execution, stores: Stores) -> PythonRuns | None:
    """Python through kernels (None when the sandbox has no Python)."""
    if execution.kernels is None:
        return None
    state = StateStore(
        stores.kv, stores.blobs, ttl_s=settings.state_ttl_s,
        kv_max_bytes=int(settings.state_max_redis_size_mib * MIB),
        archive_after_s=settings.state_archive_after_s, archive_ttl_s=settings.state_archive_ttl_days * 86400,
        archive_enabled=settings.state_archive_enabled,
    )  # fmt: skip
    return PythonRuns(
        execution.kernels, state, persist_state=settings.state_persistence_enabled,
        capture_on_error=settings.state_capture_on_error,
        state_max_bytes=state_max_bytes(settings),
    )  # fmt: skip


def programmatic_runs(settings: Settings, python: PythonRuns | None, catalog: Catalog,
                      stores: Stores) -> Programmatic | None:  # fmt: skip
    """Programmatic tool calling, in Python kernels (None without them)."""
    if python is None:
        return None
    return Programmatic(python, catalog, stores.kv, file_limits(settings), token_ttl_s=settings.ptc_token_ttl_s,
                        max_rounds=settings.ptc_max_rounds)  # fmt: skip


def gauges(execution: Execution) -> list[Gauge]:
    """What /metrics reads at each scrape: runs executing and queued, kernels ready and live."""
    executor = execution.executor
    found = [
        Gauge("interpreter_runs_running", "Runs executing now", lambda: {(): executor.statistics()["running"]}),
        Gauge("interpreter_runs_queued", "Runs waiting for a slot", lambda: {(): executor.statistics()["waiting"]}),
    ]
    if execution.kernels is not None:
        pool = execution.kernels

        def kernels() -> dict[tuple[tuple[str, str], ...], float]:
            stats = pool.statistics()
            return {(("state", "ready"),): float(stats["ready"]),  # type: ignore[arg-type]
                    (("state", "live"),): float(stats["live"])}  # type: ignore[arg-type]  # fmt: skip

        found.append(Gauge("interpreter_kernels", "Python kernels by state", kernels))
    return found


async def kernels_check(execution: Execution) -> CheckResult:
    assert execution.kernels is not None
    stats = execution.kernels.statistics()
    stats["mode"], stats["mode_reason"] = execution.kernel_mode
    if execution.zygote is not None:
        stats["zygote"] = execution.zygote.statistics()
    if stats["start_failures"] and not stats["ready"] and not stats["live"]:
        return CheckResult("degraded", stats, error="Python kernels fail to start")
    return CheckResult("healthy", stats)


async def egress_check(network: SandboxNetwork) -> CheckResult:
    return CheckResult("healthy", {**network.describe(), **network.proxy.statistics()})


async def programmatic_check(engine: Programmatic) -> CheckResult:
    return CheckResult("healthy", engine.statistics())


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: ShutdownTrigger = wait_for_signal,
    notifier: Notifier | None = None,
    blueprints: Iterable[Blueprint] = (),
    egress_resolver: Resolver = system_resolver,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until ``shutdown_trigger`` returns.

    Ready once HTTP listens; ``started()`` carries the bound URLs (``http://127.0.0.1:PORT``).
    Then READY=1 goes to systemd. On shutdown: STOPPING=1, HTTP drains within
    SHUTDOWN_GRACE_SECONDS, then the services are cancelled.

    ``blueprints`` are extra routers mounted beside the built-in ones (tests use it for routes
    with controlled timing). ``egress_resolver`` answers the egress proxy's DNS questions: the machine's
    resolver, always, except in the test suite (which maps a registry's name to a loopback index).

    Raises:
        SettingsError: a setting that only shows its problem at start (missing certificate, ...).
    """
    notifier = notifier or Notifier()
    started_at = time.monotonic()
    warnings = startup_warnings(settings)
    for warning in warnings:
        log.warning(warning)
    log.info(
        "starting",
        extra={
            "fields": {
                "version": __version__,
                "settings": settings.redacted(),
                "kv": settings.kv_backend,
                "blobs": settings.blob_backend,
            }
        },
    )
    hyper = hypercorn_config(settings)

    board = ServiceBoard()
    health = HealthRegistry()
    register_base_checks(health, settings, board, warnings)
    jwt = verifier_from_settings(
        settings.codeapi_jwt_enabled, settings.codeapi_jwt_public_key, settings.codeapi_jwt_jwks_file,
        settings.codeapi_jwt_jwks_url, settings.codeapi_jwt_issuer, settings.codeapi_jwt_audience,
    )  # fmt: skip
    authenticator = KeyAuthenticator(settings.all_api_keys, settings.master_api_key, settings.auth_enabled, jwt)

    shutting_down = trio.Event()

    async def stop_when_triggered() -> None:
        await shutdown_trigger()
        notifier.notify("STOPPING=1")
        shutting_down.set()  # open WebSockets stop their runs and close with 1001

    # Outer resources first (STYLE §3): the sandbox network and host, the asyncio bridge, the stores.
    with open_network(settings, egress_resolver) as network, open_execution(settings, network) as execution:
        if network is not None:
            log.info("sandbox network", extra={"fields": {**network.describe(), "skill_deps_path": str(
                settings.skill_deps_path), "unusable_registries": list(network.registries.skipped)}})  # fmt: skip
        log.info("python kernels", extra={"fields": {"mode": execution.kernel_mode[0],
                                                    "why": execution.kernel_mode[1]}})  # fmt: skip
        async with trio_asyncio.open_loop(), open_stores(settings) as stores:
            health.register("sandbox", partial(sandbox_check, execution))
            register_store_checks(health, stores)
            python = python_runs(settings, execution, stores)
            catalog = Catalog(stores.kv, stores.blobs, ttl_s=settings.session_ttl_h * 3600)
            deps = AppDeps(
                settings=settings,
                health=health,
                authenticator=authenticator,
                started_at=started_at,
                executor=execution.executor,
                languages=execution.languages,
                stores=stores,
                catalog=catalog,
                python=python,
                programmatic=programmatic_runs(settings, python, catalog, stores),
                shutdown=shutting_down,
                failures=FailureLimiter(
                    stores.kv,
                    limit=settings.auth_failure_limit,
                    window_s=settings.auth_failure_window_s,
                    block_s=settings.auth_failure_block_s,
                ),
                trusted_proxies=parse_networks(settings.trusted_proxies),
                keys=ManagedKeys(stores.kv, rate_limits_enabled=settings.rate_limit_enabled),
                network=network,
            )
            if execution.kernels is not None:
                health.register("kernels", partial(kernels_check, execution), required=False)
            if deps.programmatic is not None:
                engine = deps.programmatic
                health.register("programmatic", partial(programmatic_check, engine), required=False)
                deps.metrics.gauges.append(Gauge("interpreter_ptc_paused_runs", "Programmatic runs paused on this node",
                                                 lambda: {(): float(len(engine.paused))}))  # fmt: skip
            deps.metrics.gauges.extend(gauges(execution))
            if network is not None:
                health.register("egress", partial(egress_check, network), required=False)
                deps.metrics.counters += [network.proxy.tunnels, network.proxy.refusals, network.proxy.bytes]
            await _serve_with(deps, execution, board, notifier, hyper, stop_when_triggered, blueprints, task_status)
    log.info("stopped")


async def _serve_with(
    deps: AppDeps, execution: Execution, board: ServiceBoard, notifier: Notifier,
    hyper: HyperConfig, stop_when_triggered: ShutdownTrigger, blueprints: Iterable[Blueprint],
    task_status: trio.TaskStatus[list[str]],
) -> None:  # fmt: skip
    async with trio.open_nursery() as services:
        watchdog = partial(run_watchdog, notifier, board.healthy)
        await services.start(partial(supervise, watchdog, name="watchdog", board=board))
        reaper_service = partial(reaper.run, execution.reaper, execution.runner.is_active)
        await services.start(partial(supervise, reaper_service, name="reaper", board=board))
        if deps.network is not None:  # before anything that starts a sandbox
            await services.start(partial(supervise, deps.network.proxy.run, name="egress_proxy", board=board))
        await services.start(partial(supervise, execution.executor.run, name="executor", board=board))
        if deps.authenticator.jwt is not None and deps.authenticator.jwt.jwks_url is not None:
            jwks = partial(refresh_forever, deps.authenticator.jwt)
            await services.start(partial(supervise, jwks, name="jwks_refresh", board=board))
        settings = deps.settings
        cleanup = partial(session_cleanup.run, deps.catalog, settings.session_cleanup_interval_min * 60,
                          settings.enable_orphan_s3_cleanup, (StoreError,))  # fmt: skip
        await services.start(partial(supervise, cleanup, name="session_cleanup", board=board))
        if execution.zygote is not None:
            await services.start(partial(supervise, execution.zygote.run, name="zygote", board=board))
        if deps.python is not None:
            await services.start(partial(supervise, deps.python.pool.run, name="kernel_pool", board=board))
            if settings.state_archive_enabled:
                archiver = partial(state_archiver.run, deps.python.state, settings.state_archive_check_interval_s,
                                   (StoreError,))  # fmt: skip
                await services.start(partial(supervise, archiver, name="state_archiver", board=board))
        if deps.programmatic is not None:
            await services.start(partial(supervise, deps.programmatic.run, name="programmatic", board=board))

        # HTTP binds last and drains first: its nursery ends when hypercorn has drained.
        async with trio.open_nursery() as http:
            app = create_app(deps, blueprints=blueprints)
            binds: list[str] = await http.start(
                partial(hypercorn_serve, app, hyper, shutdown_trigger=stop_when_triggered)  # type: ignore[arg-type]
            )
            log.info("listening", extra={"fields": {"urls": binds}})
            notifier.notify("READY=1")
            task_status.started(binds)
        services.cancel_scope.cancel()
