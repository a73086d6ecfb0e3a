"""The package registries sandboxes may reach, read from the package managers' own configuration.

The default allowlist is not written down here: it is whatever pip, npm, Go and cargo on this machine
are configured to use (environment first, then their configuration files, then each tool's built-in
default), so a site with an internal mirror gets that mirror and nothing else. The sandbox then gets
the same registries in its environment, so its tools use exactly what the proxy lets through. Only
``https`` URLs on port 443, by name, count: the proxy tunnels nothing else (a ``file://``, plain-HTTP
or IP-address index is left out, and ``interpreter doctor`` says so). The proxy also refuses names
that resolve to private addresses, so a mirror must be reachable at a public address.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from interpreter.egress.allowlist import Refused, normalise_host

PYPI = "https://pypi.org/simple"
PYPI_FILES = {"pypi.org": "files.pythonhosted.org"}  # where an index's files live, when not on the index itself
NPM = "https://registry.npmjs.org/"
GOPROXY, GOSUMDB = "https://proxy.golang.org,direct", "sum.golang.org"
# cargo's crates.io: the sparse index, the downloads, and the web API (cargo search, cargo install's lookups).
CARGO_HOSTS = ("index.crates.io", "static.crates.io", "crates.io")


def without_credentials(url: str) -> str:
    """``url`` without a user or password (hostile code in a sandbox can read its own environment)."""
    parts = urlsplit(url.strip())
    if parts.username is None and parts.password is None:
        return url
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def https_host(url: str) -> str | None:
    """The host of an https URL on the default port, by name (the proxy refuses addresses), else None."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        return None
    try:
        return normalise_host(parts.hostname) if parts.port in (None, 443) else None
    except (ValueError, Refused):  # a port that is not a number, or an IP literal
        return None


@dataclass(frozen=True)
class Registries:
    pip_indexes: tuple[str, ...]  # the first is the index, the rest extra indexes
    npm_registry: str
    goproxy: str
    gosumdb: str
    skipped: tuple[str, ...] = field(default=())  # configured URLs the proxy cannot serve (file://, http://, IPs)
    withheld: tuple[str, ...] = field(default=())  # hosts whose configured URL carries credentials

    def hosts(self) -> list[str]:
        found: list[str] = []
        for url in (*self.pip_indexes, self.npm_registry, *re.split(r"[,|]", self.goproxy)):
            if (host := https_host(url)) is not None:
                found += [host, *([PYPI_FILES[host]] if host in PYPI_FILES else [])]
        if self.gosumdb not in ("", "off"):
            name, _, rest = self.gosumdb.partition(" ")
            found.append(https_host(rest) or name.split("+")[0].lower())
        found += CARGO_HOSTS
        return sorted(set(found))

    def sandbox_env(self) -> dict[str, str]:
        """The registries for the sandbox's tools, without any credentials the host's configuration holds."""
        goproxy = re.sub(r"https?://[^,|]+", lambda url: without_credentials(url.group()), self.goproxy)
        env = {"NPM_CONFIG_REGISTRY": without_credentials(self.npm_registry), "GOPROXY": goproxy,
               "GOSUMDB": self.gosumdb}  # fmt: skip
        indexes = [without_credentials(url) for url in self.pip_indexes]
        if indexes:
            env["PIP_INDEX_URL"] = indexes[0]
        if indexes[1:]:
            env["PIP_EXTRA_INDEX_URL"] = " ".join(indexes[1:])
        return env


def _pip_setting(environ: Mapping[str, str], files: list[Path], key: str) -> str | None:
    if (value := environ.get("PIP_" + key.upper().replace("-", "_"))) is not None:
        return value
    found = None
    for path in files:  # later files override earlier ones, as pip reads them
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        for section in ("global", "install"):
            if parser.has_option(section, key):
                found = parser.get(section, key)
    return found


def _npm_registry(environ: Mapping[str, str], files: list[Path]) -> str:
    for name in ("NPM_CONFIG_REGISTRY", "npm_config_registry"):
        if environ.get(name):
            return environ[name]
    for path in files:  # user, then global, then built-in: the first that sets it wins
        try:
            text = path.read_text()
        except OSError:
            continue
        if match := re.search(r"^\s*registry\s*=\s*(\S+)\s*$", text, re.MULTILINE):
            return match.group(1)
    return NPM


def _go_env(environ: Mapping[str, str], go_env: Path, key: str, default: str) -> str:
    if environ.get(key):
        return environ[key]
    try:
        text = go_env.read_text()
    except OSError:
        return default
    match = re.search(rf"^\s*{key}\s*=\s*(\S+)\s*$", text, re.MULTILINE)
    return match.group(1) if match else default


def discover(environ: Mapping[str, str], venv: Path, root: Path = Path("/")) -> Registries:
    """The registries this machine's package managers use (``root`` is for tests)."""
    pip_files = [root / "etc/pip.conf", root / "etc/xdg/pip/pip.conf", venv / "pip.conf"]
    index = _pip_setting(environ, pip_files, "index-url") or PYPI
    extra = (_pip_setting(environ, pip_files, "extra-index-url") or "").split()
    npm_files = [root / "etc/npmrc", root / "usr/etc/npmrc", root / "usr/share/nodejs/npm/npmrc",
                 root / "usr/lib/node_modules/npm/npmrc"]  # fmt: skip
    npm = _npm_registry(environ, npm_files)
    go_env = root / "usr/lib/go/go.env"
    goproxy = _go_env(environ, go_env, "GOPROXY", GOPROXY)
    gosumdb = _go_env(environ, go_env, "GOSUMDB", GOSUMDB)
    indexes = [url for url in (index, *extra) if https_host(url)]
    skipped = [without_credentials(url) for url in (index, *extra, npm) if not https_host(url)]
    if not https_host(npm):
        npm = NPM
    urls = [*indexes, npm, *re.findall(r"https?://[^,|]+", goproxy)]
    withheld = sorted({urlsplit(url).hostname or "" for url in urls if without_credentials(url) != url})
    return Registries(tuple(indexes), npm, goproxy, gosumdb, tuple(skipped), tuple(withheld))
