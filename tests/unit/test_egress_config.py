"""The allowlist's names and the registries it is derived from (pure functions, files under a fake root)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from interpreter.egress.allowlist import Allowlist, Refused, normalise_host
from interpreter.egress.proxy import is_public
from interpreter.egress.registries import discover
from interpreter.egress.service import open_network
from interpreter.errors import SettingsError
from interpreter.settings import load_settings


def test_entries_are_exact_names_or_dot_suffixes() -> None:
    allowlist = Allowlist.of(["PyPI.org.", ".pythonhosted.org", " ", "registry.npmjs.org"])
    assert allowlist.entries() == ["pypi.org", "registry.npmjs.org", ".pythonhosted.org"]
    assert allowlist.allows("pypi.org")
    assert allowlist.allows("files.pythonhosted.org")
    assert not allowlist.allows("pythonhosted.org")  # a suffix covers the names below it
    assert not allowlist.allows("www.pypi.org")  # an exact entry covers itself only
    assert not allowlist.allows("evilpypi.org")


@pytest.mark.parametrize("entry", ["10.0.0.1", "::1", "2130706433", "bad_name.org", "x" * 64 + ".org"])
def test_an_invalid_entry_is_a_configuration_error(entry: str) -> None:
    with pytest.raises(ValueError, match=r"literals|valid"):
        Allowlist.of([entry])


@pytest.mark.parametrize("name", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0x7f.1", "[::1]", "::1",
                                  "1.2.3.4.", "0177.0.0.1"])  # fmt: skip
def test_ip_literals_are_refused_in_any_spelling(name: str) -> None:
    with pytest.raises(Refused) as refused:
        normalise_host(name)
    assert refused.value.status == 403


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
     ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
     ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False), ("::1", False), ("::", False),
     ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
     ("2002:7f00:1::", False), ("fec0::1", False), ("64:ff9b::7f00:1", False)],
)  # fmt: skip
def test_only_public_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_the_defaults_are_each_tools_own(tmp_path: Path) -> None:
    registries = discover({}, tmp_path / "venv", root=tmp_path)
    assert registries.hosts() == ["crates.io", "files.pythonhosted.org", "index.crates.io", "proxy.golang.org",
                                  "pypi.org", "registry.npmjs.org", "static.crates.io", "sum.golang.org"]  # fmt: skip
    assert registries.sandbox_env()["PIP_INDEX_URL"] == "https://pypi.org/simple"


def test_a_sites_mirrors_replace_the_public_registries(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/pip.conf").write_text(
        "[global]\nindex-url = https://pypi.corp.example/simple\nextra-index-url = file:///opt/wheels\n"
        "  https://more.corp.example:443/simple\n"
    )
    (tmp_path / "usr/etc").mkdir(parents=True)
    (tmp_path / "usr/etc/npmrc").write_text("cafile=/x\nregistry=https://npm.corp.example/\n")
    environ = {"GOPROXY": "https://goproxy.corp.example|direct", "GOSUMDB": "sum.corp+ABC https://sumdb.corp.example"}
    registries = discover(environ, tmp_path / "venv", root=tmp_path)
    hosts = registries.hosts()
    assert {"pypi.corp.example", "more.corp.example", "npm.corp.example", "goproxy.corp.example",
            "sumdb.corp.example"} <= set(hosts)  # fmt: skip
    assert not {"pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "proxy.golang.org"} & set(hosts)
    assert registries.skipped == ("file:///opt/wheels",)  # the proxy cannot serve it: doctor says so
    env = registries.sandbox_env()
    assert env["PIP_INDEX_URL"] == "https://pypi.corp.example/simple"
    assert env["PIP_EXTRA_INDEX_URL"] == "https://more.corp.example:443/simple"
    assert env["NPM_CONFIG_REGISTRY"] == "https://npm.corp.example/"
    assert env["GOPROXY"] == "https://goproxy.corp.example|direct"


def test_the_environment_wins_over_files_and_a_plain_http_index_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/pip.conf").write_text("[global]\nindex-url = https://pypi.corp.example/simple\n")
    registries = discover({"PIP_INDEX_URL": "http://insecure.example/simple", "GOSUMDB": "off"}, tmp_path / "v",
                          root=tmp_path)  # fmt: skip
    assert "insecure.example" not in registries.hosts()
    assert "pypi.corp.example" not in registries.hosts()
    assert registries.skipped == ("http://insecure.example/simple",)
    assert "sum.golang.org" not in registries.hosts()


def test_a_mirror_given_by_address_is_left_out_not_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy tunnels to names only: an index at an IP address is reported, and the start goes on."""
    environ = {"PIP_INDEX_URL": "https://10.0.0.5/simple", "NPM_CONFIG_REGISTRY": "https://[fd00::1]/"}
    registries = discover(environ, tmp_path / "venv", root=tmp_path)
    assert registries.skipped == ("https://10.0.0.5/simple", "https://[fd00::1]/")
    assert "registry.npmjs.org" in registries.hosts()  # npm falls back to its default, as for any unusable URL
    assert not {"10.0.0.5", "fd00::1"} & set(registries.hosts())
    settings = load_settings({"ENABLE_SANDBOX_NETWORK": "true", "SKILL_DEPS_PATH": str(tmp_path / "deps")},
                             env_file=None)  # fmt: skip
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with open_network(settings) as network:
        assert network is not None
        assert network.registries.skipped == registries.skipped


@pytest.mark.parametrize(
    ("env", "message"),
    [({"ENABLE_NETWORK_ISOLATION": "false"}, "needs ENABLE_NETWORK_ISOLATION=true"),
     ({"SKILL_DEPS_MAX_MB": "8"}, "SKILL_DEPS_MAX_MB: at least 16"),
     ({"SANDBOX_EGRESS_ALLOWLIST": "10.0.0.1"}, "SANDBOX_EGRESS_ALLOWLIST: '10.0.0.1': IP literals")],
)  # fmt: skip
def test_settings_that_cannot_work_stop_the_start(tmp_path: Path, env: dict[str, str], message: str) -> None:
    settings = load_settings({"ENABLE_SANDBOX_NETWORK": "true", "SKILL_DEPS_PATH": str(tmp_path), **env},
                             env_file=None)  # fmt: skip
    with pytest.raises(SettingsError, match=re.escape(message)), open_network(settings):
        pass
    assert not any(tmp_path.iterdir())  # refused before anything was made


def test_off_means_nothing_is_made(tmp_path: Path) -> None:
    with open_network(load_settings({"SKILL_DEPS_PATH": str(tmp_path / "deps")}, env_file=None)) as network:
        assert network is None
    assert not (tmp_path / "deps").exists()


def test_one_server_per_cache_directory(tmp_path: Path) -> None:
    settings = load_settings({"ENABLE_SANDBOX_NETWORK": "true", "SKILL_DEPS_PATH": str(tmp_path)}, env_file=None)
    with open_network(settings) as first:
        assert first is not None
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".salt", "images", "mounts"]
        with pytest.raises(SettingsError, match="another instance"), open_network(settings):
            pass
    with open_network(settings) as again:  # the first released the directory at its end
        assert again is not None


def test_credentials_in_a_registry_url_never_reach_a_sandbox(tmp_path: Path) -> None:
    environ = {"PIP_INDEX_URL": "https://user:s3cret@pypi.corp.example/simple",
               "NPM_CONFIG_REGISTRY": "https://:t0ken@npm.corp.example/",
               "GOPROXY": "https://go:pw@goproxy.corp.example,direct"}  # fmt: skip
    registries = discover(environ, tmp_path / "venv", root=tmp_path)
    env = registries.sandbox_env()
    assert env["PIP_INDEX_URL"] == "https://pypi.corp.example/simple"
    assert env["NPM_CONFIG_REGISTRY"] == "https://npm.corp.example/"
    assert env["GOPROXY"] == "https://goproxy.corp.example,direct"
    assert not any(secret in str(env) for secret in ("s3cret", "t0ken", "go:pw"))
    assert registries.withheld == ("goproxy.corp.example", "npm.corp.example", "pypi.corp.example")
    assert {"pypi.corp.example", "npm.corp.example", "goproxy.corp.example"} <= set(registries.hosts())
