"""Sandbox network access assembled from the settings: the proxy, the package caches, the jails' side."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from interpreter.egress.allowlist import Allowlist
from interpreter.egress.deps import MIN_MIB, TOOLS, DepsError, SkillDeps
from interpreter.egress.netns import NSENTER
from interpreter.egress.proxy import EgressProxy, Resolver, Tap, system_resolver
from interpreter.egress.registries import Registries, discover
from interpreter.errors import ServiceUnavailable, SettingsError
from interpreter.settings import Settings
from sandboxes.host import HostError
from sandboxes.jail import Egress

if TYPE_CHECKING:
    from interpreter.execution.launcher import Launch

MIB = 1024 * 1024
NEEDED_TOOLS = (NSENTER, *TOOLS)


@dataclass(frozen=True)
class SandboxNetwork:
    proxy: EgressProxy
    deps: SkillDeps
    jail: Egress  # the proxy's port and the registries' settings; ``deps`` is set per principal
    registries: Registries

    async def jail_for(self, owner: str) -> Egress:
        """The jail side for a sandbox of ``owner`` (a principal's storage prefix): with its package cache."""
        if not owner:
            raise ValueError("a sandbox with the network on belongs to a principal")
        try:
            return replace(self.jail, deps=await self.deps.ensure(owner))
        except DepsError:
            raise ServiceUnavailable("The package cache could not be prepared; see the server log") from None

    def attach(self, listener: socket.socket, run_id: str, owner: str) -> Tap:
        return self.proxy.attach(listener, run_id, owner)

    async def connect(self, launch: Launch, owner: str) -> Egress:
        """The jail side for ``launch`` (a one-shot run or an nsjail kernel of ``owner``), its namespace's
        listener handed to the proxy."""
        egress = await self.jail_for(owner)
        launch.tap = self.attach(launch.take_listener(), launch.run_id, owner)
        return egress

    def describe(self) -> dict[str, object]:
        """For /health/detailed (no host path, no configured URL: tenants can read it)."""
        return {"allowlist": self.proxy.allowlist.entries(), "port": self.jail.port,
                "skill_deps_max_bytes": self.deps.max_bytes}  # fmt: skip


def missing_tools() -> str | None:
    """What this host lacks for the sandbox network (None: nothing), and how to get it."""
    missing = [tool for tool in NEEDED_TOOLS if not Path(tool).exists()]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install util-linux mount e2fsprogs)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices (/dev/loop-control): package caches are loop-mounted images (modprobe loop)"
    return None


def allowlist_for(settings: Settings, registries: Registries) -> Allowlist:
    try:
        return Allowlist.of(registries.hosts() + list(settings.sandbox_egress_allowlist))
    except ValueError as exc:
        raise SettingsError(f"SANDBOX_EGRESS_ALLOWLIST: {exc}") from None


def settings_problem(settings: Settings) -> str | None:
    """Why these settings cannot give sandboxes their network (None: they can; ENABLE_SANDBOX_NETWORK on)."""
    if not settings.enable_network_isolation:
        return ("ENABLE_SANDBOX_NETWORK=true needs ENABLE_NETWORK_ISOLATION=true: a sandbox on the host's network "
                "would bypass the egress proxy")  # fmt: skip
    if settings.skill_deps_max_mib < MIN_MIB:
        return f"SKILL_DEPS_MAX_MB: at least {MIN_MIB} with ENABLE_SANDBOX_NETWORK=true"
    return None


@contextmanager
def open_network(settings: Settings, resolver: Resolver = system_resolver) -> Iterator[SandboxNetwork | None]:
    """None unless ENABLE_SANDBOX_NETWORK; the package caches are unmounted and their directory's lock released
    at the end of the block. ``resolver`` is the machine's; only the test suite passes another.

    Raises:
        SettingsError: an invalid allowlist entry, a cache size too small for a filesystem, or an unusable
            SKILL_DEPS_PATH.
    """
    if not settings.enable_sandbox_network:
        yield None
        return
    if problem := settings_problem(settings):
        raise SettingsError(problem)
    if missing := missing_tools():
        raise SettingsError(f"ENABLE_SANDBOX_NETWORK: {missing}")
    registries = discover(os.environ, settings.sandbox_venv)
    proxy = EgressProxy(allowlist_for(settings, registries), resolver)
    deps = SkillDeps(Path(settings.skill_deps_path), settings.skill_deps_max_mib * MIB)
    try:
        lock = deps.prepare()
    except HostError as exc:
        raise SettingsError(f"SKILL_DEPS_PATH: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"SKILL_DEPS_PATH: cannot prepare {settings.skill_deps_path}: {exc.strerror}") from None
    jail = Egress(port=settings.sandbox_egress_port, registries_env=tuple(sorted(registries.sandbox_env().items())))
    try:
        yield SandboxNetwork(proxy, deps, jail, registries)
    finally:
        deps.unmount_all()  # every jail is gone by now; the images stay for the next start
        os.close(lock)
