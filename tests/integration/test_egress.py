"""The sandbox network end to end: pip inside real sandboxes installs from a package index the test serves
over HTTPS on loopback (the proxy's test resolver maps PyPI's names to it; nothing leaves the machine),
the package persists for its principal only, and admins see and purge the caches."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator

import httpx
import pytest

from interpreter.auth.principals import env_principal
from tests.conftest import TEST_KEY, ServerProcess, open_dir
from tests.egress.index import (
    FILES_HOST,
    GO_HOST,
    INDEX_HOST,
    NPM_HOST,
    PackageIndex,
    make_go_module,
    make_npm_package,
    make_wheel,
    package_index,
)
from tests.egress.serving import REBIND, network_server

pytestmark = pytest.mark.nsjail

OTHER_KEY = "other-tenant-" + secrets.token_hex(12)
MASTER = "master-" + secrets.token_hex(12)
WHEEL = make_wheel("egresstest_pkg", "1.0", "VALUE = 42\n")
KERNEL_WHEEL = make_wheel("kerneltest_pkg", "2.0", "VALUE = 'from the kernel'\n")
NPM_PACKAGE = make_npm_package("egresstest-npm", "1.2.3", "module.exports = () => 'from npm';\n")
GO_MODULE = "egresstest.example/hello"
GO_FILES = {"go.mod": f"module {GO_MODULE}\n\ngo 1.19\n",
            "main.go": 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hello from go") }\n'}  # fmt: skip


@pytest.fixture(scope="module")
def index() -> Iterator[PackageIndex]:
    directory = open_dir("interp-index-")
    try:
        wheels = {"egresstest-pkg": WHEEL, "kerneltest-pkg": KERNEL_WHEEL}
        npm = {"egresstest-npm": ("1.2.3", NPM_PACKAGE)}
        go = {GO_MODULE: ("v1.0.0", make_go_module(GO_MODULE, "v1.0.0", GO_FILES))}
        with package_index(directory, wheels, npm, go) as served:
            yield served
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def server(index: PackageIndex) -> Iterator[ServerProcess]:
    with network_server("interp-egress-", index.port, API_KEYS=OTHER_KEY, MASTER_API_KEY=MASTER,
                        SKILL_DEPS_MAX_MB="48", MAX_EXECUTION_TIME="120") as instance:  # fmt: skip
        yield instance


def pip_install(index: PackageIndex, package: str) -> str:
    """bash that trusts the test's CA (as a site would trust its mirror's) and pip-installs ``package``."""
    return index.trusting(f"pip install --cert /tmp/ca.pem --no-input {package} 2>&1 | tail -2\n")


def test_pip_installs_from_the_registry_through_the_proxy(server: ServerProcess, index: PackageIndex) -> None:
    check = "python3 -c 'import egresstest_pkg; print(\"value\", egresstest_pkg.VALUE)'"
    code = pip_install(index, "egresstest-pkg") + check
    result = server.exec(code, "bash", timeout_s=180)
    assert "Successfully installed egresstest-pkg-1.0" in str(result["stdout"]), result
    assert "value 42" in str(result["stdout"])
    assert f"{INDEX_HOST} /simple/egresstest-pkg/" in index.requests  # by name, through the proxy's tunnel
    assert any(line.startswith(f"{FILES_HOST} /packages/egresstest_pkg-1.0") for line in index.requests)
    finished = [line for line in server.log_lines() if line.get("msg") == "run finished" and "egress" in line]
    assert finished[-1]["egress"]["tunnels"] >= 2  # the index and the file host
    assert finished[-1]["egress"]["received"] > len(WHEEL[1])


def test_the_package_persists_for_its_principal_in_later_kernels_and_one_shot_runs(server: ServerProcess) -> None:
    """Later runs (other uids: a new kernel, another one-shot) import it; a run can add to what one installed."""
    assert server.exec("import egresstest_pkg\nprint(egresstest_pkg.VALUE)", "py")["stdout"] == "42\n"
    one_shot = server.exec("python3 -c 'import egresstest_pkg; print(egresstest_pkg.VALUE)'", "bash")
    assert one_shot["stdout"] == "42\n", one_shot
    added = server.exec("mkdir -p /opt/skill-deps/python/second && echo 'X = 1' > "
                        "/opt/skill-deps/python/second/__init__.py && echo ok", "bash")  # fmt: skip
    assert added["stdout"] == "ok\n", added
    assert server.exec("import second, egresstest_pkg\nprint(second.X)", "py")["stdout"] == "1\n"


def test_a_python_kernel_installs_and_imports_in_the_same_cell(server: ServerProcess, index: PackageIndex) -> None:
    """What an agent does: pip from the running kernel (a subprocess), then import at once."""
    code = (
        "import pathlib, subprocess, sys\n"
        f"pathlib.Path('/tmp/ca.pem').write_text({index.ca_pem.decode()!r})\n"
        "done = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--cert', '/tmp/ca.pem',"
        " 'kerneltest-pkg'], capture_output=True, text=True)\n"
        "print(done.returncode, done.stderr[-300:])\n"
        "import kerneltest_pkg\nprint(kerneltest_pkg.VALUE)\n"
    )
    result = server.exec(code, "py", timeout_s=180)
    assert result["stdout"] == "0 \nfrom the kernel\n", result


def test_npm_installs_globally_into_the_cache_through_the_proxy(server: ServerProcess, index: PackageIndex) -> None:
    code = index.trusting("npm install -g --cafile /tmp/ca.pem egresstest-npm 2>&1 | tail -3\n"
                          "node -e 'console.log(\"result\", require(\"egresstest-npm\")())'\n")  # fmt: skip
    result = server.exec(code, "bash", timeout_s=180)
    assert "result from npm" in str(result["stdout"]), result
    assert f"{NPM_HOST} /egresstest-npm" in index.requests
    assert f"{NPM_HOST} /egresstest-npm/-/egresstest-npm-1.2.3.tgz" in index.requests
    later = server.exec("console.log(require('egresstest-npm')())", "js")  # another run, another uid
    assert later["stdout"] == "from npm\n", later


def test_go_installs_a_module_through_the_proxy(server: ServerProcess, index: PackageIndex) -> None:
    """go install from the module proxy; the checksum database is the one thing the test cannot serve."""
    code = index.trusting(f"SSL_CERT_FILE=/tmp/ca.pem GONOSUMDB={GO_MODULE} go install {GO_MODULE}@v1.0.0 2>&1 "
                          "| tail -3\nhello\n")  # fmt: skip
    result = server.exec(code, "bash", timeout_s=180)
    assert str(result["stdout"]).endswith("\nhello from go\n"), result  # installed in the cache's go/bin, on PATH
    assert f"{GO_HOST} /{GO_MODULE}/@v/v1.0.0.zip" in index.requests
    assert server.exec("ls /opt/skill-deps/go/pkg/mod/egresstest.example", "bash")["stdout"] == "hello@v1.0.0\n"


def test_another_principal_never_sees_it(server: ServerProcess) -> None:
    result = server.exec("import egresstest_pkg", "py", key=OTHER_KEY)
    assert "ModuleNotFoundError: No module named 'egresstest_pkg'" in str(result["stderr"])
    listing = server.exec("ls -A /opt/skill-deps/python; echo end", "bash", key=OTHER_KEY)
    assert listing["stdout"] == "end\n"


def test_a_full_cache_is_the_installers_problem_not_the_hosts(server: ServerProcess) -> None:
    fill = "head -c 100000000 /dev/zero > /opt/skill-deps/cache/big; echo $?; rm /opt/skill-deps/cache/big"
    result = server.exec(fill, "bash", key=OTHER_KEY)
    assert "No space left on device" in str(result["stderr"]), result
    usage = httpx.get(f"{server.url}/api/v1/admin/skill-deps", headers={"x-api-key": MASTER}).json()
    assert all(entry["used_bytes"] <= entry["limit_bytes"] == 48 * 2**20 for entry in usage["principals"])


def test_admins_see_and_purge_one_principals_cache(server: ServerProcess) -> None:
    admin = {"x-api-key": MASTER}
    usage = httpx.get(f"{server.url}/api/v1/admin/skill-deps", headers=admin).json()
    assert usage["enabled"] is True
    assert len(usage["principals"]) == 2  # both tenants have run with the network on
    assert usage["ecosystems"]["python"]["bytes"] > 0
    assert usage["total_bytes"] == sum(entry["used_bytes"] for entry in usage["principals"])
    assert httpx.post(f"{server.url}/api/v1/admin/skill-deps/purge", headers=admin).status_code == 415
    bad = httpx.post(f"{server.url}/api/v1/admin/skill-deps/purge", headers=admin, json={"principal_prefix": "x"})
    assert bad.status_code == 422
    forbidden = httpx.post(f"{server.url}/api/v1/admin/skill-deps/purge", headers=server.headers, json={})
    assert forbidden.status_code == 403
    mine = env_principal(TEST_KEY)
    both = httpx.post(f"{server.url}/api/v1/admin/skill-deps/purge", headers=admin,
                      json={"principal": mine.id, "principal_prefix": mine.storage_prefix})  # fmt: skip
    assert (both.status_code, both.json()["error_type"]) == (422, "validation")  # not a guess of which
    assert "not both" in both.json()["details"][0]["message"]
    assert mine.storage_prefix in {entry["principal_prefix"] for entry in usage["principals"]}
    purged = httpx.post(f"{server.url}/api/v1/admin/skill-deps/purge", headers=admin,
                        json={"principal": mine.id}).json()  # fmt: skip
    assert purged["purged"] is True
    assert purged["principals"] == 1
    assert purged["freed_bytes"] > 0
    result = server.exec("import egresstest_pkg", "py")
    assert "ModuleNotFoundError" in str(result["stderr"])  # a fresh, empty cache
    assert len(httpx.get(f"{server.url}/api/v1/admin/skill-deps", headers=admin).json()["principals"]) == 2


def test_health_and_metrics_show_the_sandbox_network(server: ServerProcess) -> None:
    detailed = httpx.get(f"{server.url}/health/detailed", headers=server.headers).json()
    egress = detailed["services"]["egress"]["details"]
    assert {"pypi.org", "files.pythonhosted.org", "registry.npmjs.org", REBIND} <= set(egress["allowlist"])
    metrics = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("interpreter_egress_"))
    assert float(samples["interpreter_egress_tunnels_total"]) >= 2  # the installs above went through it
    assert float(samples['interpreter_egress_bytes_total{direction="in"}']) > len(WHEEL[1])
