"""Sessions and files on both store pairs: ownership, expiry, cleanup, resolution order, what a run mounts."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio_asyncio

from interpreter.execution.sessions import resolve_session
from interpreter.execution.workspace import FileLimits, Ref, plan_workspace
from interpreter.files.catalog import ORPHAN_GRACE_S, Catalog, FileRecord, Session
from interpreter.settings import load_settings
from interpreter.stores.blobs_dir import open_dir_blobs
from interpreter.stores.kv_sqlite import open_sqlite_kv
from tests.stores.conftest import s3_config

OWNER, OTHER = "a" * 16, "b" * 16
LIMITS = FileLimits(max_file_bytes=1 << 20, max_output_files=10, max_files_per_session=300, max_name_bytes=255)


@pytest.fixture(params=["embedded", "distributed"])
async def catalog(request: pytest.FixtureRequest, work_dir: Path) -> AsyncIterator[Catalog]:
    if request.param == "embedded":
        async with open_sqlite_kv(work_dir / "kv.sqlite3") as kv, open_dir_blobs(work_dir / "blobs") as blobs:
            yield Catalog(kv, blobs, ttl_s=3600)
        return
    from interpreter.stores.blobs_s3 import open_s3_blobs
    from interpreter.stores.kv_redis import RedisConfig, open_redis_kv

    settings = load_settings({"REDIS_URL": request.getfixturevalue("redis_url")}, env_file=None)
    redis = replace(RedisConfig.from_settings(settings), namespace=f"sessions-{secrets.token_hex(6)}:")
    s3 = s3_config(request.getfixturevalue("s3_endpoint"))
    async with trio_asyncio.open_loop(), open_redis_kv(redis) as kv, open_s3_blobs(s3) as blobs:
        yield Catalog(kv, blobs, ttl_s=3600)


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def add_file(catalog: Catalog, session: Session, name: str, data: bytes = b"data") -> FileRecord:
    file_id, size = await catalog.put_blob(session, one_chunk(data), max_bytes=1 << 20)
    record = FileRecord(id=file_id, session_id=session.id, name=name, size=size, content_type="text/plain",
                        original_filename=name, origin="upload")  # fmt: skip
    await catalog.add(session, record)
    return record


async def content(catalog: Catalog, record: FileRecord, owner: str = OWNER) -> bytes:
    async with contextlib.aclosing(catalog.read(record, owner)) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def test_sessions_and_files_belong_to_their_owner(catalog: Catalog) -> None:
    session = await catalog.create_session(OWNER, "exec", user_id="u1")
    assert len(session.id) == 21
    record = await add_file(catalog, session, "a.txt", b"mine")
    assert await catalog.session(OWNER, session.id) == session
    assert await catalog.file(OWNER, session.id, record.id) == record
    assert await content(catalog, record) == b"mine"
    # Another principal knows both ids and still finds nothing.
    assert await catalog.session(OTHER, session.id) is None
    assert await catalog.file(OTHER, session.id, record.id) is None
    for malformed in ("", "../" + session.id, session.id + ":x", None, 7):
        assert await catalog.session(OWNER, malformed) is None


async def test_an_expired_session_hides_its_files_and_the_sweep_removes_them(catalog: Catalog) -> None:
    short = Catalog(catalog.kv, catalog.blobs, ttl_s=0.4)
    session = await short.create_session(OWNER, "upload")
    record = await add_file(short, session, "a.txt")
    kept = await catalog.create_session(OWNER, "upload")
    kept_record = await add_file(catalog, kept, "b.txt")
    await trio.sleep(0.8)
    assert await short.session(OWNER, session.id) is None
    assert await short.file(OWNER, session.id, record.id) is None
    assert [b.key for b in await catalog.blobs.list(f"sessions/{OWNER}/{session.id}/")]  # bytes still there
    removed = await catalog.sweep(orphans=False)
    assert removed["sessions"] >= 1
    assert removed["files"] >= 1
    assert await catalog.blobs.list(f"sessions/{OWNER}/{session.id}/") == []
    assert await catalog.kv.hgetall(f"files:{OWNER}:{session.id}") == {}
    assert await catalog.file(OWNER, kept.id, kept_record.id) == kept_record  # the live one is untouched


async def test_use_extends_a_sessions_life(catalog: Catalog) -> None:
    short = Catalog(catalog.kv, catalog.blobs, ttl_s=0.6)
    session = await short.create_session(OWNER, "exec")
    for _ in range(3):
        await trio.sleep(0.3)
        await short.touch(session)
    assert await short.session(OWNER, session.id) == session


async def test_the_orphan_sweep_removes_only_old_blobs_without_metadata(catalog: Catalog) -> None:
    session = await catalog.create_session(OWNER, "upload")
    visible = await add_file(catalog, session, "kept.txt")
    orphan_id, _ = await catalog.put_blob(session, one_chunk(b"orphan"), max_bytes=100)
    orphan_key = catalog.blob_key(OWNER, session.id, orphan_id)
    assert (await catalog.sweep(orphans=True))["orphan_blobs"] == 0  # young: maybe an upload in progress
    assert (await catalog.sweep(orphans=False, now=time.time() + ORPHAN_GRACE_S + 60))["orphan_blobs"] == 0
    removed = await catalog.sweep(orphans=True, now=time.time() + ORPHAN_GRACE_S + 60)
    assert removed["orphan_blobs"] >= 1
    assert await catalog.blobs.head(orphan_key) is None
    assert await content(catalog, visible) == b"data"


async def test_resolution_order_stays_within_principal_and_user(catalog: Catalog) -> None:
    async def resolve(owner: str = OWNER, user: str | None = "u1", **rules: object) -> tuple[str, str]:
        resolved = await resolve_session(catalog, owner, user_id=user, **rules)  # type: ignore[arg-type]
        return resolved.session.id, resolved.status

    first, status = await resolve(hint="conversation-1", entity_id="agent_1")
    assert status == "new"
    assert await resolve(session_id=first) == (first, "reused")
    assert await resolve(hint="conversation-1") == (first, "reused")
    assert await resolve(file_session_ids=["unknown-session-id-xx", first]) == (first, "reused")
    assert await resolve(entity_id="agent_1") == (first, "reused")
    # The explicit id comes before the hint.
    second, _ = await resolve(hint="conversation-2")
    assert await resolve(session_id=second, hint="conversation-1") == (second, "reused")
    # Another user of the same principal, or another principal: never this session.
    for owner, user in ((OWNER, "u2"), (OWNER, None), (OTHER, "u1")):
        for rules in ({"session_id": first}, {"hint": "conversation-1"}, {"file_session_ids": [first]},
                      {"entity_id": "agent_1"}):  # fmt: skip
            other, status = await resolve(owner, user, **rules)
            assert (other != first, status) == (True, "new")
    # An upload session is reused only when named explicitly, never through a file reference.
    uploads = await catalog.create_session(OWNER, "upload", user_id="u1")
    assert (await resolve(file_session_ids=[uploads.id]))[1] == "new"
    assert await resolve(session_id=uploads.id) == (uploads.id, "reused")


async def test_a_run_mounts_the_newest_version_of_each_name_and_the_refs(catalog: Catalog) -> None:
    session = await catalog.create_session(OWNER, "exec")
    old = await add_file(catalog, session, "data.csv", b"old")
    await trio.sleep(0.01)
    new = await add_file(catalog, session, "data.csv", b"new")
    own_other = await add_file(catalog, session, "notes.txt")
    uploads = await catalog.create_session(OWNER, "upload")
    upload = await add_file(catalog, uploads, "report.txt")
    shadow = await add_file(catalog, uploads, "notes.txt", b"from the ref")
    foreign_session = await catalog.create_session(OTHER, "upload")
    foreign = await add_file(catalog, foreign_session, "secret.txt")
    refs = [
        Ref(session.id, old.id, "data.csv"),  # an older version of a name the session has newer
        Ref(uploads.id, upload.id, "../sub/report.txt"),  # sanitised: ".." is dropped
        Ref(uploads.id, shadow.id, "notes.txt"),  # a ref beats the session's own file of that name
        Ref(foreign_session.id, foreign.id, "secret.txt"),
        Ref(uploads.id, "x" * 21, "gone.txt"),
    ]
    workspace = await plan_workspace(catalog, session, refs, LIMITS)
    mounted = {mount.name: (mount.record.id, mount.explicit) for mount in workspace.mounts}
    assert mounted == {"data.csv": (new.id, False), "sub/report.txt": (upload.id, True), "notes.txt": (shadow.id, True)}
    assert own_other.id not in {record_id for record_id, _ in mounted.values()}
    assert workspace.notes == ["Not mounted in /mnt/data (not found or expired): 'secret.txt', 'gone.txt'."]
