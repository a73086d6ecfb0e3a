"""HTTPS with a certificate the test generates: explicit, automatic, and refused when files are missing."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from interpreter.errors import SettingsError
from tests.conftest import KEY_HEADERS, cli_env, make_settings, running_server


def write_self_signed(directory: Path, cert_name: str = "fullchain.pem", key_name: str = "privkey.pem") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / cert_name
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / key_name).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def test_explicit_https_serves_tls_with_hsts(work_dir: Path) -> None:
    certs = work_dir / "certs"
    cert = write_self_signed(certs, "server.crt", "server.key")
    settings = make_settings(
        work_dir,
        ENABLE_HTTPS="true",
        SSL_CERTS_PATH=str(certs),
        SSL_CERT_FILE="server.crt",
        SSL_KEY_FILE=str(certs / "server.key"),
    )
    async with running_server(settings) as (url, _):
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=trusting(cert), timeout=10) as http:
            response = await http.get(f"{url}/health")
            assert response.json()["status"] == "healthy"
            assert response.headers["strict-transport-security"].startswith("max-age=")
            detailed = await http.get(f"{url}/health/detailed", headers=KEY_HEADERS)
            assert detailed.json()["services"]["security"]["details"]["https"] is True
        plain_url = url.replace("https://", "http://")
        async with httpx.AsyncClient(timeout=5) as http:
            with pytest.raises(httpx.TransportError):  # no plain HTTP on the TLS port
                await http.get(f"{plain_url}/health")


async def test_https_auto_enables_when_the_guide_files_exist(work_dir: Path) -> None:
    cert = write_self_signed(work_dir / "ssl")  # SSL_CERTS_PATH/fullchain.pem + privkey.pem, the /app/ssl defaults
    async with running_server(make_settings(work_dir)) as (url, _):
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=trusting(cert), timeout=10) as http:
            assert (await http.get(f"{url}/health")).status_code == 200


async def test_https_false_overrides_present_files(work_dir: Path) -> None:
    write_self_signed(work_dir / "ssl")
    async with running_server(make_settings(work_dir, ENABLE_HTTPS="false")) as (url, _):
        assert url.startswith("http://")


async def test_https_true_without_files_is_refused(work_dir: Path) -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(SettingsError, match="SSL_CERT_FILE"), flatten_subgroups=True):
        async with running_server(make_settings(work_dir, ENABLE_HTTPS="true")):
            pass


@pytest.mark.slow
def test_cli_exits_2_when_https_files_are_missing(work_dir: Path) -> None:
    env = cli_env(
        ENABLE_HTTPS="true",
        SSL_CERTS_PATH=str(work_dir / "none"),
        SANDBOX_BASE_DIR=str(work_dir / "sb"),
        API_HOST="127.0.0.1",
        PORT="0",
    )
    result = subprocess.run(
        [sys.executable, "-m", "interpreter", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=work_dir,
    )
    assert result.returncode == 2
    assert "SSL_CERT_FILE" in result.stderr.strip().splitlines()[-1]
