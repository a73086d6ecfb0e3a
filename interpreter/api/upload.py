"""``POST /upload`` and ``POST /upload/batch``: files into a session, streamed to the blob store.

Each file part goes to the store as it arrives (never whole in memory). A file becomes visible
only when the whole request has been read and every check passed: a refused, broken or abandoned
upload leaves nothing behind (its blobs are removed; whatever a crash leaves, the cleanup finds).

Fields: ``entity_id``, ``kind``/``id``/``version`` (current LibreChat), ``read_only`` (batch), and
``session_id`` to add to an existing session of the caller (it must come before the first file).
The ``User-Id`` header names the user the session belongs to.
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
from dataclasses import dataclass, field, replace
from typing import Any

from quart import Blueprint, request

from interpreter.api.app import AppDeps, current_deps, current_principal
from interpreter.api.execute import ENTITY_ID, file_limits
from interpreter.api.multipart import MultipartReader
from interpreter.api.openapi import documented
from interpreter.errors import InterpreterError, ValidationFailed
from interpreter.files.catalog import FileRecord, Session
from interpreter.files.names import sanitize_path, unique_name
from interpreter.stores.protocols import BlobTooLarge

blueprint = Blueprint("upload", __name__)

CONTENT_TYPE = re.compile(r"^[\w.+-]{1,64}/[\w.+-]{1,128}$")
TRUE = frozenset({"1", "true", "yes"})
USER_ID_MAX = 256


class TooLarge(InterpreterError):
    status = 413
    error_type = "resource_exhausted"
    message = "Upload too large"


@dataclass
class Upload:
    """One request's progress: blobs stored so far (not yet visible) and per-file outcomes."""

    batch: bool
    fields: dict[str, str] = field(default_factory=dict)
    session: Session | None = None
    session_names: set[str] = field(default_factory=set)
    taken: set[str] = field(default_factory=set)  # names given in this request
    pending: list[FileRecord] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0


def _content_type(declared: str | None, name: str) -> str:
    declared = (declared or "").split(";")[0].strip().lower()
    if CONTENT_TYPE.match(declared) and declared != "application/octet-stream":
        return declared
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


async def _session_for(deps: AppDeps, owner: str, upload: Upload, user_id: str | None) -> Session:
    """The caller's session named by a ``session_id`` field, else a new upload session."""
    existing = await deps.catalog.session(owner, upload.fields.get("session_id"))
    if existing is not None and existing.user_id == user_id:
        await deps.catalog.touch(existing)
        upload.session_names = {record.name for record in await deps.catalog.files(existing)}
        return existing
    entity_id = upload.fields.get("entity_id") or None
    entity_id = entity_id if entity_id is not None and ENTITY_ID.match(entity_id) else None
    return await deps.catalog.create_session(owner, "upload", user_id=user_id, entity_id=entity_id)


async def _receive(upload: Upload) -> None:
    deps = current_deps()
    limits = file_limits(deps.settings)
    owner = current_principal().storage_prefix
    user_id = (request.headers.get("User-Id") or "")[:USER_ID_MAX] or None
    reader = MultipartReader(request.body, request.headers.get("content-type"))
    file_fields = ("file",) if upload.batch else ("file", "files")
    while (part := await reader.next_part()) is not None:
        if part.filename is None:
            upload.fields[part.name] = (await reader.text()).strip()
            continue
        if part.name not in file_fields:
            continue
        if upload.session is None:
            upload.session = await _session_for(deps, owner, upload, user_id)
        name = unique_name(sanitize_path(part.filename, max_bytes=limits.max_name_bytes, nested=upload.batch),
                           upload.taken)  # fmt: skip
        if name not in upload.session_names and len(upload.session_names) >= limits.max_files_per_session:
            raise TooLarge(f"Too many files. Maximum {limits.max_files_per_session} files allowed per session")
        try:
            async with contextlib.aclosing(reader.data()) as data:
                file_id, size = await deps.catalog.put_blob(upload.session, data, max_bytes=limits.max_file_bytes)
        except BlobTooLarge:
            message = f"File {name} exceeds maximum size of {limits.max_file_bytes >> 20}MB"
            if not upload.batch:
                raise TooLarge(message) from None
            upload.failed += 1
            upload.outcomes.append({"status": "error", "filename": part.filename, "error": message})
            continue
        upload.session_names.add(name)
        record = FileRecord(
            id=file_id, session_id=upload.session.id, name=name, size=size,
            content_type=_content_type(part.content_type, name), original_filename=part.filename, origin="upload",
        )  # fmt: skip
        upload.pending.append(record)
        upload.outcomes.append({"status": "success", "fileId": file_id, "filename": name})
    if upload.session is None:
        raise ValidationFailed(
            details=[{"field": "body -> file", "message": "At least one file required", "code": "missing"}]
        )


async def _publish(upload: Upload) -> None:
    """Make the stored files visible (the last step: every check has passed)."""
    assert upload.session is not None
    fields = upload.fields
    read_only = fields.get("read_only", "").lower() in TRUE if upload.batch else bool(fields.get("entity_id"))
    catalog = current_deps().catalog
    while upload.pending:
        await catalog.add(upload.session, replace(upload.pending[0], read_only=read_only))
        upload.pending.pop(0)


async def _handle(batch: bool) -> dict[str, Any]:
    upload = Upload(batch=batch)
    try:
        await _receive(upload)
        await _publish(upload)
    finally:
        if upload.pending and upload.session is not None:  # refused, broken or abandoned: nothing stays
            await current_deps().catalog.discard_blobs(upload.session, [record.id for record in upload.pending])
    assert upload.session is not None
    sid = upload.session.id
    reply: dict[str, Any] = {"message": "success", "session_id": sid, "storage_session_id": sid}
    if not batch:
        return reply | {"files": [{"fileId": o["fileId"], "filename": o["filename"]} for o in upload.outcomes]}
    succeeded = len(upload.outcomes) - upload.failed
    reply["message"] = "success" if not upload.failed else ("error" if not succeeded else "partial")
    return reply | {"files": upload.outcomes, "succeeded": succeeded, "failed": upload.failed}


@blueprint.post("/upload")
@documented(
    "Upload files into a new session (or the session named by a session_id field)",
    tag="files",
    errors={413: "A file over MAX_FILE_SIZE_MB, or the session over MAX_FILES_PER_SESSION",
            415: "Not multipart/form-data", 422: "No file part, or a malformed body"},
    description="multipart/form-data with one or more `file` (or `files`) parts; optional `entity_id`, `kind`, "
    "`id`, `version`, `session_id` fields and a `User-Id` header. Streamed to storage.",
)  # fmt: skip
async def upload_files() -> dict[str, Any]:
    return await _handle(batch=False)


@blueprint.post("/upload/batch")
@documented(
    "Upload many files (nested names kept) into one session, with a status per file",
    tag="files",
    errors={413: "The session would exceed MAX_FILES_PER_SESSION", 415: "Not multipart/form-data",
            422: "No file part, or a malformed body"},
    description="`file` parts whose file names may contain directories; `read_only=true` mounts them read-only. "
    "A file over MAX_FILE_SIZE_MB is an error entry, not a failed request.",
)  # fmt: skip
async def upload_batch() -> dict[str, Any]:
    return await _handle(batch=True)
