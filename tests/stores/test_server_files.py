"""Sessions and files on Redis + S3: two servers sharing one Redis and one S3 endpoint, and stores that
fail in the middle of an upload."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import ServerProcess
from tests.stores.conftest import DEFAULT_MOTO_SERVER, StoreServer, moto_answers, need_binary, redis_server


def test_two_servers_share_sessions_and_files(bases: tuple[Path, Path], redis_url: str, s3_endpoint: str) -> None:
    shared = {"REDIS_URL": redis_url, "S3_ENDPOINT": s3_endpoint, "S3_REGION": "us-east-1",
              "S3_BUCKET": f"scale-{secrets.token_hex(6)}", "MAX_EXECUTION_TIME": "20"}  # fmt: skip
    node_a, node_b = ServerProcess(bases[0], **shared), ServerProcess(bases[1], **shared)
    node_a.start()
    node_b.start()
    try:
        uploaded = httpx.post(f"{node_a.url}/upload", headers={**node_a.headers, "User-Id": "u1"}, timeout=30,
                              files=[("file", ("numbers.txt", b"1\n2\n3\n", "text/plain"))]).json()  # fmt: skip
        sid, fid = uploaded["session_id"], uploaded["files"][0]["fileId"]
        code = (
            "nums = [int(x) for x in open('numbers.txt')]\nopen('sum.txt', 'w').write(str(sum(nums)))\nprint(len(nums))"
        )
        result = node_b.exec(code, "py", user_id="u1", files=[{"id": fid, "session_id": sid, "name": "numbers.txt"}])
        assert result["stdout"] == "3\n"
        outputs = [f for f in result["files"] if not f.get("inherited")]
        assert [f["name"] for f in outputs] == ["sum.txt"]
        exec_sid = result["session_id"]
        download = httpx.get(f"{node_a.url}/download/{exec_sid}/{outputs[0]['id']}", headers=node_a.headers, timeout=30)
        assert download.content == b"6"
        listing = httpx.get(f"{node_b.url}/files/{exec_sid}?detail=simple", headers=node_b.headers, timeout=30)
        assert [entry["name"] for entry in listing.json()] == ["sum.txt"]
        # The session continues on the other node, with its file.
        again = node_a.exec("print(open('sum.txt').read())", "py", session_id=exec_sid, user_id="u1")
        assert (again["session_id"], again["runtime_status"], again["stdout"]) == (exec_sid, "restored", "6\n")
    finally:
        assert node_a.stop() == 0
        assert node_b.stop() == 0


def redis_file_keys(port: int) -> int:
    """How many file metadata keys the Redis on ``port`` holds."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"KEYS files:*\r\n")
        time.sleep(0.2)
        reply = sock.recv(1 << 20).decode()
    return int(reply.split("\r\n", 1)[0].lstrip("*"))


def stalling_body(before_rest: object) -> Iterator[bytes]:
    """A one-file multipart body that calls ``before_rest()`` once the server is storing the file."""
    yield b'--cut\r\nContent-Disposition: form-data; name="file"; filename="cut.bin"\r\n\r\n' + b"a" * 200_000
    time.sleep(0.5)
    before_rest()  # type: ignore[operator]
    yield b"b" * 200_000 + b"\r\n--cut--\r\n"


def post_stalling(server: ServerProcess, before_rest: object) -> httpx.Response:
    headers = {**server.headers, "content-type": "multipart/form-data; boundary=cut"}
    return httpx.post(f"{server.url}/upload", content=stalling_body(before_rest), headers=headers, timeout=60)


def test_redis_failing_mid_upload_leaves_no_file_and_the_server_recovers(bases: tuple[Path, Path]) -> None:
    store = redis_server()
    store.start()
    server = ServerProcess(bases[0], REDIS_URL=f"redis://127.0.0.1:{store.port}/0")  # blobs stay in DATA_DIR
    server.start()
    try:
        blobs = bases[0] / "data" / "blobs"
        response = post_stalling(server, store.stop)
        assert response.status_code == 503
        assert response.json()["error_type"] == "service_unavailable"
        assert "Retry-After" in response.headers
        assert [p for p in blobs.rglob("*") if p.is_file()] == []  # the stored blob was removed again
        store.start(port=store.port)
        for _ in range(10):  # a stale pooled connection may fail once
            retry = httpx.post(f"{server.url}/upload", headers=server.headers, timeout=30,
                               files=[("file", ("after.txt", b"ok", "text/plain"))])  # fmt: skip
            if retry.status_code == 200:
                break
            time.sleep(0.5)
        assert retry.status_code == 200
        assert redis_file_keys(store.port) == 1
    finally:
        assert server.stop() == 0
        store.close()


def test_s3_failing_mid_upload_leaves_no_file(bases: tuple[Path, Path], redis_url: str) -> None:
    binary = os.environ.get("MOTO_SERVER_BIN", DEFAULT_MOTO_SERVER)
    need_binary(binary, "moto_server")
    moto = StoreServer("moto", lambda port: [binary, "-H", "127.0.0.1", "-p", str(port)], moto_answers)
    moto.start()
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    # A database of its own on the shared Redis, so the count below is this test's alone.
    stores = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/7", "S3_ENDPOINT": f"127.0.0.1:{moto.port}",
              "S3_REGION": "us-east-1", "S3_BUCKET": f"cut-{secrets.token_hex(6)}"}  # fmt: skip
    server = ServerProcess(bases[0], **stores)
    server.start()
    try:
        response = post_stalling(server, moto.stop)
        assert response.status_code == 503
        assert response.json()["error"] == "Storage is temporarily unavailable"
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as sock:
            sock.sendall(b"SELECT 7\r\n")
            sock.recv(64)
            sock.sendall(b"KEYS files:*\r\n")
            time.sleep(0.2)
            assert sock.recv(1024).startswith(b"*0\r\n")  # no file became visible
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0
        moto.close()
