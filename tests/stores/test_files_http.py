"""Sessions and files over HTTP, on both store pairs: upload, listings, download, delete, files in runs.

Two servers sharing Redis + S3, and stores failing mid-upload, are in tests/stores/test_server_files.py.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trio_asyncio

from tests.conftest import ServerProcess, serving
from tests.stores.conftest import open_raw_s3

OTHER_KEY = "other-key-" + secrets.token_hex(12)
SMALL = {"MAX_FILE_SIZE_MB": "1", "MAX_FILES_PER_SESSION": "6", "MAX_OUTPUT_FILES": "3"}


@pytest.fixture(scope="module", params=["embedded", "redis+s3"])
def files_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    stores: dict[str, str] = {}
    if request.param == "redis+s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        stores = {"REDIS_URL": request.getfixturevalue("redis_url"), "S3_ENDPOINT": endpoint,
                  "S3_REGION": "us-east-1", "S3_BUCKET": f"files-{secrets.token_hex(6)}"}  # fmt: skip
    with serving("interp-files-", API_KEYS=OTHER_KEY, MAX_EXECUTION_TIME="20", **SMALL, **stores) as instance:
        yield instance


def upload(
    server: ServerProcess, files: list[tuple[str, bytes]], *, path: str = "/upload", field: str = "file",
    data: dict[str, str] | None = None, headers: dict[str, str] | None = None,
) -> httpx.Response:  # fmt: skip
    parts = [(field, (name, content, "application/octet-stream")) for name, content in files]
    return httpx.post(f"{server.url}{path}", files=parts, data=data or {},
                      headers={**server.headers, **(headers or {})}, timeout=60)  # fmt: skip


def uploaded(server: ServerProcess, name: str, content: bytes, **kwargs: Any) -> tuple[str, str]:
    response = upload(server, [(name, content)], **kwargs)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["session_id"], body["files"][0]["fileId"]


def get(server: ServerProcess, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers={"x-api-key": key or server.key}, timeout=30)


def blob_files(server: ServerProcess) -> list[str]:
    """Every blob the server's store holds, temporary files and pending S3 multipart uploads included."""
    if "S3_ENDPOINT" not in server.env:
        return sorted(str(p) for p in (server.base / "data").rglob("*") if p.is_file() and "blobs" in p.parts)

    async def listing() -> list[str]:
        async with trio_asyncio.open_loop(), open_raw_s3(server.env["S3_ENDPOINT"]) as raw:
            bucket = server.env["S3_BUCKET"]
            objects = (await raw("list_objects_v2", Bucket=bucket)).get("Contents", [])
            pending = (await raw("list_multipart_uploads", Bucket=bucket)).get("Uploads", [])
            return sorted([o["Key"] for o in objects] + [f"pending:{u['Key']}" for u in pending])

    return trio.run(listing)


def run(server: ServerProcess, code: str, lang: str = "py", **fields: object) -> dict[str, Any]:
    return server.exec(code, lang, 120, **fields)


# --- upload and the read side --------------------------------------------------------------------------


def test_upload_and_listings_have_the_shapes_librechat_parses(files_server: ServerProcess) -> None:
    name = "My Report (2024) été.csv"
    response = upload(files_server, [(name, b"a,b\n1,2\n")], data={"entity_id": "agent_1"},
                      headers={"User-Id": "user-1"})  # fmt: skip
    assert response.status_code == 200
    body = response.json()
    sid, fid = body["session_id"], body["files"][0]["fileId"]
    assert body == {"message": "success", "session_id": sid, "storage_session_id": sid,
                    "files": [{"fileId": fid, "filename": name}]}  # fmt: skip
    assert len(sid) == len(fid) == 21

    full = get(files_server, f"/files/{sid}?detail=full").json()
    assert len(full) == 1
    entry = full[0]
    assert entry["name"] == f"{sid}/{fid}"
    assert entry["id"] == fid
    assert entry["metadata"] == {"content-type": "text/csv", "original-filename": name}
    assert entry["size"] == 8
    assert entry["contentType"] == "text/csv"
    assert entry["lastModified"][-7] == "."
    assert not entry["lastModified"].endswith("Z")
    summary = get(files_server, f"/files/{sid}?detail=summary").json()
    assert summary == [{"name": f"{sid}/{fid}", "lastModified": summary[0]["lastModified"]}]
    assert summary[0]["lastModified"].endswith("Z")
    assert summary[0]["lastModified"][-5] == "."
    assert get(files_server, f"/files/{sid}?detail=simple").json() == [{"id": fid, "name": name, "path": f"/{name}"}]
    probe = get(files_server, f"/sessions/{sid}/objects/{fid}?kind=user&id=user-1").json()
    assert probe["lastModified"] == summary[0]["lastModified"]

    download = get(files_server, f"/download/{sid}/{fid}?kind=user&id=user-1")
    assert download.status_code == 200
    assert download.content == b"a,b\n1,2\n"
    assert download.headers["content-type"] == "text/csv; charset=utf-8"
    assert download.headers["content-disposition"] == (
        f"attachment; filename=\"My_Report__2024__ete.csv\"; filename*=UTF-8''{quote(name, safe='')}"
    )
    assert download.headers["content-length"] == "8"
    # The /v1 prefix serves the same routes.
    assert get(files_server, f"/v1/download/{sid}/{fid}").content == b"a,b\n1,2\n"


def test_batch_upload_keeps_nested_names_and_reports_each_file(files_server: ServerProcess) -> None:
    response = upload(
        files_server,
        [("skills/weather/SKILL.md", b"# skill"), ("../../etc/x.txt", b"x"), ("big.bin", b"\0" * (1024 * 1024 + 1))],
        path="/upload/batch", data={"kind": "skill", "id": "skill-1", "version": "2", "read_only": "true"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    sid = body["session_id"]
    assert (body["message"], body["succeeded"], body["failed"], body["storage_session_id"]) == ("partial", 2, 1, sid)
    ok = [f for f in body["files"] if f["status"] == "success"]
    assert [f["filename"] for f in ok] == ["skills/weather/SKILL.md", "etc/x.txt"]
    assert body["files"][2] == {"status": "error", "filename": "big.bin", "error": "File big.bin exceeds maximum "
                                "size of 1MB"}  # fmt: skip
    assert {e["name"] for e in get(files_server, f"/files/{sid}?detail=simple").json()} == {
        "skills/weather/SKILL.md", "etc/x.txt"}  # fmt: skip
    # read_only: the run sees the file at its nested path and cannot change it.
    refs = [{"id": f["fileId"], "storage_session_id": sid, "name": f["filename"], "kind": "skill",
             "resource_id": "skill-1", "version": 2} for f in ok]  # fmt: skip
    code = (
        "cat skills/weather/SKILL.md; echo; echo more >> skills/weather/SKILL.md || echo refused; "
        "chmod 666 etc/x.txt || echo kept"
    )
    result = run(files_server, code, "bash", files=refs)
    assert result["stdout"].splitlines()[0] == "# skill"
    assert "refused" in result["stdout"]
    assert "kept" in result["stdout"]
    assert result["files"] == [{"id": f["fileId"], "name": f["filename"], "session_id": sid, "storage_session_id": sid,
                                "inherited": True} for f in sorted(ok, key=lambda f: f["filename"])]  # fmt: skip


def test_oversize_and_too_many_files_are_413_and_store_nothing(files_server: ServerProcess) -> None:
    before = blob_files(files_server)
    response = upload(files_server, [("ok.txt", b"fine"), ("big.bin", b"\0" * (1024 * 1024 + 1))])
    assert response.status_code == 413
    assert response.json()["error"] == "File big.bin exceeds maximum size of 1MB"
    assert response.json()["error_type"] == "resource_exhausted"
    assert blob_files(files_server) == before  # the first file was removed again
    # The per-session limit holds across requests: six files, then the seventh is refused.
    sid, _ = uploaded(files_server, "f0.txt", b"0")
    for i in range(1, 6):
        assert upload(files_server, [(f"f{i}.txt", b"x")], data={"session_id": sid}).json()["session_id"] == sid
    refused = upload(files_server, [("f6.txt", b"x")], data={"session_id": sid})
    assert refused.status_code == 413
    assert "Maximum 6 files" in refused.json()["error"]
    assert len(get(files_server, f"/files/{sid}").json()) == 6
    # A new version of a name the session has does not count as another file.
    assert upload(files_server, [("f0.txt", b"v2")], data={"session_id": sid}).status_code == 200


def test_a_chunked_upload_without_content_length_works(files_server: ServerProcess) -> None:
    boundary = "chunkedboundary42"
    payload = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="stream.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\n".encode()
        + b"line\n" * 50_000
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def body() -> Iterator[bytes]:
        for start in range(0, len(payload), 7000):
            yield payload[start : start + 7000]

    content_type = f"multipart/form-data; boundary={boundary}"
    response = httpx.post(f"{files_server.url}/upload", content=body(), timeout=60,
                          headers={**files_server.headers, "content-type": content_type})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.request.headers.get("transfer-encoding") == "chunked"
    sid, fid = response.json()["session_id"], response.json()["files"][0]["fileId"]
    assert get(files_server, f"/download/{sid}/{fid}").content == b"line\n" * 50_000


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b"{}", 415),
        ("multipart/form-data; boundary=xx", b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a"', 422),
        ("multipart/form-data; boundary=xx", b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--xx--',
         422),
        ("multipart/form-data", b"", 422),
    ],
    ids=["json", "truncated", "no-file", "no-boundary"],
)  # fmt: skip
def test_malformed_uploads_get_a_clear_error(files_server: ServerProcess, content_type: str, body: bytes,
                                             status: int) -> None:  # fmt: skip
    before = blob_files(files_server)
    response = httpx.post(f"{files_server.url}/upload", content=body, timeout=30,
                          headers={**files_server.headers, "content-type": content_type})  # fmt: skip
    assert response.status_code == status
    assert set(response.json()) >= {"error", "error_type", "request_id"}
    assert blob_files(files_server) == before


def test_a_client_that_disconnects_mid_upload_leaves_nothing(files_server: ServerProcess) -> None:
    before = blob_files(files_server)
    head = b'--bb\r\nContent-Disposition: form-data; name="file"; filename="half.bin"\r\n\r\n' + b"x" * 300_000
    request = (f"POST /upload HTTP/1.1\r\nHost: x\r\nx-api-key: {files_server.key}\r\nContent-Length: 900000\r\n"
               "Content-Type: multipart/form-data; boundary=bb\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", files_server.port)) as sock:
        sock.sendall(request + head)
        time.sleep(0.5)  # the server is storing the part when the client goes away
    deadline = time.monotonic() + 10
    while blob_files(files_server) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert blob_files(files_server) == before
    assert files_server.healthy()


# --- ownership and unknown ids ---------------------------------------------------------------------------


def test_another_principal_sees_nothing(files_server: ServerProcess) -> None:
    sid, fid = uploaded(files_server, "private.txt", b"secret")
    assert get(files_server, f"/files/{sid}", key=OTHER_KEY).json() == []
    for path in (f"/download/{sid}/{fid}", f"/sessions/{sid}/objects/{fid}"):
        response = get(files_server, path, key=OTHER_KEY)
        assert (response.status_code, response.json()["error"]) == (404, "File not found")
    deleted = httpx.delete(f"{files_server.url}/files/{sid}/{fid}", headers={"x-api-key": OTHER_KEY}, timeout=30)
    assert deleted.status_code == 404
    # Naming the session or the file in a run gets the other principal a new, empty session.
    body = {"lang": "bash", "code": "ls", "session_id": sid,
            "files": [{"id": fid, "session_id": sid, "name": "private.txt"}]}  # fmt: skip
    response = httpx.post(f"{files_server.url}/exec", headers={"x-api-key": OTHER_KEY}, timeout=60, json=body)
    result = response.json()
    assert result["session_id"] != sid
    assert result["runtime_status"] == "new"
    assert result["stdout"] == "code.sh\n"  # only the program itself
    assert "Not mounted in /mnt/data (not found or expired): 'private.txt'." in result["stderr"]
    assert get(files_server, f"/download/{sid}/{fid}").content == b"secret"  # still there for its owner


def test_unknown_sessions_and_files(files_server: ServerProcess) -> None:
    unknown = "U" * 21
    assert get(files_server, f"/files/{unknown}").json() == []
    assert get(files_server, "/files/not-an-id").json() == []
    for path in (f"/download/{unknown}/{unknown}", f"/sessions/{unknown}/objects/{unknown}", "/download/../x"):
        assert get(files_server, path).status_code == 404
    sid, fid = uploaded(files_server, "doomed.txt", b"x")
    url = f"{files_server.url}/files/{sid}/{fid}"
    assert httpx.delete(url, headers=files_server.headers, timeout=30).status_code == 204
    assert httpx.delete(url, headers=files_server.headers, timeout=30).status_code == 404
    assert get(files_server, f"/download/{sid}/{fid}").status_code == 404
    assert get(files_server, f"/files/{sid}").json() == []


# --- files in runs ------------------------------------------------------------------------------------------


def test_a_run_reads_refs_edits_them_and_its_outputs_come_back(files_server: ServerProcess) -> None:
    sid, fid = uploaded(files_server, "data.csv", b"x\n1\n")
    code = (
        "import os\n"
        "print(open('in/data.csv').read().strip())\n"
        "open('in/data.csv', 'a').write('2\\n')\n"
        "os.makedirs('charts/2024', exist_ok=True)\n"
        "_ = open('charts/2024/plot résumé.txt', 'w').write('made')\n"
    )
    result = run(files_server, code, user_id="user-1",
                 files=[{"id": fid, "storage_session_id": sid, "name": "in/data.csv", "kind": "user"}])  # fmt: skip
    assert result["status"] == "ok", result
    assert result["stdout"] == "x\n1\n"
    exec_sid = result["session_id"]
    assert exec_sid != sid
    assert result["runtime_session_id"] == exec_sid
    assert result["runtime_status"] == "new"
    by_name = {f["name"]: f for f in result["files"]}
    assert set(by_name) == {"in/data.csv", "charts/2024/plot résumé.txt"}
    edited = by_name["in/data.csv"]
    assert edited["modified_from"] == {"id": fid, "storage_session_id": sid}
    assert edited["session_id"] == edited["storage_session_id"] == exec_sid
    assert edited["id"] != fid
    assert get(files_server, f"/download/{exec_sid}/{edited['id']}").content == b"x\n1\n2\n"
    assert get(files_server, f"/download/{sid}/{fid}").content == b"x\n1\n"  # the upload is unchanged
    # The next run of the session (found through the file it refers to) sees the newest version of each file;
    # what it deletes leaves the session.
    again = run(files_server, "cat in/data.csv; rm 'charts/2024/plot résumé.txt'", "bash", user_id="user-1",
                files=[{"id": edited["id"], "session_id": exec_sid, "name": "in/data.csv"}])  # fmt: skip
    assert (again["session_id"], again["runtime_status"]) == (exec_sid, "reused")
    assert again["stdout"] == "x\n1\n2\n"
    assert again["deleted_files"] == ["charts/2024/plot résumé.txt"]
    assert again["files"] == [{"id": edited["id"], "name": "in/data.csv", "session_id": exec_sid,
                               "storage_session_id": exec_sid, "inherited": True}]  # fmt: skip
    names = [e["name"] for e in get(files_server, f"/files/{exec_sid}?detail=simple").json()]
    assert names == ["in/data.csv"]


def test_the_api_key_era_fallback_finds_files_through_the_listing(files_server: ServerProcess) -> None:
    first = run(files_server, "_ = open('out.txt', 'w').write('v1')")
    sid = first["session_id"]
    listing = get(files_server, f"/files/{sid}?detail=full").json()
    # What @librechat/agents 3.1.63 does with a session id and no refs.
    refs = [{"id": e["name"].split("/")[1].split(".")[0], "session_id": sid, "name": e["metadata"]["original-filename"]}
            for e in listing]  # fmt: skip
    result = run(files_server, "print(open('out.txt').read())", files=refs)
    assert result["stdout"] == "v1\n"


def test_collection_reports_what_it_does_not_save_and_never_follows_links(files_server: ServerProcess) -> None:
    code = (
        "import os\n"
        "for i in range(5): open(f'out{i}.txt', 'w').write(str(i))\n"
        "os.symlink('/etc/passwd', 'passwd.txt')\n"
        "os.symlink('/etc', 'etcdir')\n"
        "os.mkfifo('pipe')\n"
        "open('.hidden', 'w').write('h')\n"
        "_ = open('bad\\x01name\\n.txt', 'w').write('b')\n"
    )
    result = run(files_server, code)
    assert result["status"] == "ok", result
    names = [f["name"] for f in result["files"]]
    assert names == ["bad_name_.txt", "out0.txt", "out1.txt"]  # sorted, capped at MAX_OUTPUT_FILES=3
    assert "Not saved (more than MAX_OUTPUT_FILES=3 files): 'out2.txt', 'out3.txt', 'out4.txt'." in result["stderr"]
    sid = result["session_id"]
    stored = {e["name"] for e in get(files_server, f"/files/{sid}?detail=simple").json()}
    assert stored == set(names)


def test_a_stateful_host_continues_its_session_by_hint(files_server: ServerProcess) -> None:
    hint = "conversation-" + secrets.token_hex(4)
    first = run(files_server, "_ = open('state.txt', 'w').write('kept')", runtime_session_hint=hint, user_id="u")
    second = run(files_server, "print(open('state.txt').read())", runtime_session_hint=hint, user_id="u")
    assert (second["session_id"], second["runtime_status"]) == (first["session_id"], "reused")
    assert second["stdout"] == "kept\n"
    other_user = run(files_server, "import os; print(os.listdir())", runtime_session_hint=hint, user_id="v")
    assert other_user["runtime_status"] == "new"
    assert other_user["stdout"] == "[]\n"


def test_a_huge_upload_is_streamed_not_buffered(work_dir: Path) -> None:
    """100 MB in, server memory up by far less (the reply must not wait for the whole body in memory)."""
    server = ServerProcess(work_dir)
    server.start()
    try:
        assert server.proc is not None
        status = Path(f"/proc/{server.proc.pid}/status")
        upload(server, [("warm.txt", b"x")])

        def peak_rss_kib() -> int:
            line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
            return int(line.split()[1])

        before = peak_rss_kib()
        chunk = secrets.token_bytes(1024 * 1024)

        def body() -> Iterator[bytes]:
            yield b'--big\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
            for _ in range(100):
                yield chunk
            yield b"\r\n--big--\r\n"

        headers = {**server.headers, "content-type": "multipart/form-data; boundary=big"}
        response = httpx.post(f"{server.url}/upload", content=body(), timeout=120, headers=headers)
        assert response.status_code == 200, response.text
        grown_mib = (peak_rss_kib() - before) / 1024
        assert grown_mib < 20, f"peak RSS grew by {grown_mib:.1f} MiB"
        entry = get(server, f"/files/{response.json()['session_id']}").json()[0]
        assert entry["size"] == 100 * 1024 * 1024
    finally:
        server.stop()


def test_outputs_are_json_serialisable_in_the_keepalive_path(files_server: ServerProcess) -> None:
    result = run(files_server, "import time; time.sleep(3.5); _ = open('late.txt', 'w').write('x')")
    assert [f["name"] for f in result["files"]] == ["late.txt"]
    json.dumps(result)


def test_the_cleanup_service_removes_expired_sessions_files(work_dir: Path) -> None:
    server = ServerProcess(work_dir, SESSION_TTL_HOURS="0.0005", SESSION_CLEANUP_INTERVAL_MINUTES="0.01")
    server.start()
    try:
        sid, fid = uploaded(server, "short-lived.txt", b"x")
        assert len(blob_files(server)) == 1
        deadline = time.monotonic() + 30
        while blob_files(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert blob_files(server) == []  # 1.8 s of life, then the next pass took its bytes
        assert get(server, f"/files/{sid}").json() == []
        assert get(server, f"/download/{sid}/{fid}").status_code == 404
        removed = [line for line in server.log_lines() if line["msg"] == "expired session files removed"]
        assert removed
        assert removed[0]["files"] == 1
    finally:
        server.stop()
