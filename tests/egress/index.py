"""Package registries over HTTPS on a loopback port, for pip and npm inside a sandbox to install from.

One server plays PyPI's two hosts (the index and the file host) and npm's registry, telling them apart
by the Host header, with one certificate from a CA made for the test; the sandbox trusts that CA through
pip's ``--cert`` and npm's ``--cafile``. It serves tiny packages made here.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import ssl
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

INDEX_HOST, FILES_HOST, NPM_HOST = "pypi.org", "files.pythonhosted.org", "registry.npmjs.org"
GO_HOST = "proxy.golang.org"
HOSTS = (INDEX_HOST, FILES_HOST, NPM_HOST, GO_HOST)


def make_wheel(name: str, version: str, source: str) -> tuple[str, bytes]:
    """A pure-Python wheel with one module ``name`` whose ``__init__.py`` is ``source``."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": source.encode(),
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
            for path, data in files.items()
        )
        + f"{dist}.dist-info/RECORD,,\n"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for path, data in {**files, f"{dist}.dist-info/RECORD": record.encode()}.items():
            wheel.writestr(path, data)
    return f"{dist}-py3-none-any.whl", buffer.getvalue()


def make_npm_package(name: str, version: str, source: str) -> bytes:
    """An npm package tarball whose ``index.js`` is ``source``."""
    files = {"package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
             "package/index.js": source.encode()}  # fmt: skip
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_go_module(module: str, version: str, files: dict[str, str]) -> dict[str, bytes]:
    """What a Go module proxy serves for one version of ``module``: its .info, .mod and .zip."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, text in files.items():
            zipped.writestr(f"{module}@{version}/{name}", text)
    info = json.dumps({"Version": version, "Time": "2026-01-01T00:00:00Z"}).encode()
    return {"info": info, "mod": files["go.mod"].encode(), "zip": archive.getvalue()}


def _packument(name: str, version: str, tarball: bytes) -> bytes:
    """npm's document for a package: its one version and where its tarball is."""
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    dist = {
        "tarball": f"https://{NPM_HOST}/{name}/-/{name}-{version}.tgz",
        "integrity": integrity,
        "shasum": hashlib.sha1(tarball).hexdigest(),
    }
    return json.dumps({"name": name, "dist-tags": {"latest": version},
                       "versions": {version: {"name": name, "version": version, "dist": dist}}}).encode()  # fmt: skip


def _certificates(directory: Path) -> tuple[bytes, Path, Path]:
    """(CA certificate PEM, server certificate file, server key file) for both PyPI names."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "interpreter test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, INDEX_HOST)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host) for host in HOSTS]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file


@dataclass
class PackageIndex:
    port: int
    ca_pem: bytes
    requests: list[str]  # "host path" of every request served

    def trusting(self, commands: str) -> str:
        """bash that writes the test's CA to /tmp/ca.pem (as a site would trust its mirror's), then ``commands``."""
        return f"cat > /tmp/ca.pem <<'EOF'\n{self.ca_pem.decode()}EOF\n{commands}"


@contextmanager
def package_index(directory: Path, wheels: dict[str, tuple[str, bytes]],
                  npm: dict[str, tuple[str, bytes]] | None = None,
                  go: dict[str, tuple[str, dict[str, bytes]]] | None = None) -> Iterator[PackageIndex]:  # fmt: skip
    """Serve ``wheels`` (project name -> (file name, bytes)) as a PEP 503 index, ``npm`` (package name ->
    (version, tarball)) as an npm registry and ``go`` (module -> (version, make_go_module's)) as a Go module
    proxy, on 127.0.0.1."""
    npm, go = npm or {}, go or {}
    ca_pem, cert_file, key_file = _certificates(directory)
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = self.headers.get("Host", "").split(":")[0]
            requests.append(f"{host} {self.path}")
            parts = self.path.split("?")[0].strip("/").split("/")
            body, kind = None, "text/html"
            if host == GO_HOST and "/@v/" in self.path:
                module, _, leaf = self.path.strip("/").partition("/@v/")
                version, served = go.get(module, ("", {}))
                if leaf == "list" and served:
                    body, kind = f"{version}\n".encode(), "text/plain"
                elif leaf.startswith(f"{version}.") and served:
                    body, kind = served.get(leaf.removeprefix(f"{version}.")), "application/octet-stream"
            elif host == NPM_HOST:
                name = parts[0]
                if name in npm and len(parts) == 1:
                    body, kind = _packument(name, *npm[name]), "application/json"
                elif name in npm and parts[1:] == ["-", f"{name}-{npm[name][0]}.tgz"]:
                    body, kind = npm[name][1], "application/octet-stream"
            elif parts[0] == "simple" and len(parts) == 2 and parts[1] in wheels:
                name, data = wheels[parts[1]]
                digest = hashlib.sha256(data).hexdigest()
                body = f'<a href="https://{FILES_HOST}/packages/{name}#sha256={digest}">{name}</a>'.encode()
            elif parts[0] == "packages" and len(parts) == 2:
                found = [data for name, data in wheels.values() if name == parts[1]]
                body, kind = (found[0] if found else None), "application/octet-stream"
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield PackageIndex(server.server_address[1], ca_pem, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
