"""A server with the sandbox network on, its proxy resolving through the test resolver."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ServerProcess, open_dir, serving
from tests.egress.index import HOSTS

REPO = Path(__file__).resolve().parents[2]
SERVE_MAPPED = [sys.executable, "-m", "tests.egress.serve_mapped"]
REBIND = "rebind.example"  # allowlisted, and "resolves" to 127.0.0.1


@contextmanager
def network_server(prefix: str, index_port: int | None = None, **env: str) -> Iterator[ServerProcess]:
    """The registries' names (PyPI's, npm's, Go's) map to ``index_port`` on loopback (when given); REBIND
    answers 127.0.0.1 (refused like any inward answer); nothing else resolves. The package caches live in a
    directory of the server's own."""
    exempt = {host: ["127.0.0.1", index_port] for host in HOSTS} if index_port else {}
    mapping = {"exempt": exempt, "answers": {REBIND: ["127.0.0.1"]}}
    deps = open_dir("interp-deps-")
    try:
        with serving(
            prefix, SERVE_MAPPED, ENABLE_SANDBOX_NETWORK="true", TEST_EGRESS_RESOLVER=json.dumps(mapping),
            PYTHONPATH=str(REPO), SKILL_DEPS_PATH=str(deps), SANDBOX_EGRESS_ALLOWLIST=REBIND, **env,
        ) as instance:  # fmt: skip
            yield instance
    finally:
        shutil.rmtree(deps, ignore_errors=True)  # (its caches were unmounted when the server stopped)
