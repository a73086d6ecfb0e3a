"""The read side of sessions: listings, a freshness probe, downloads and deletes.

Shapes are the ones LibreChat parses (librechat-client.md §3, §6): listing names are
``"<session_id>/<file_id>"`` with ``metadata.original-filename``; ``lastModified`` is a naive ISO
time with microseconds in full listings and UTC milliseconds with ``Z`` in summaries and probes.
Another principal's session lists as ``[]`` and its files are 404, exactly like unknown ones.
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from quart import Blueprint, Response, jsonify, request

from interpreter.api.app import current_deps, current_principal
from interpreter.api.openapi import documented
from interpreter.errors import NotFound
from interpreter.files.catalog import FileRecord
from interpreter.stores.protocols import BlobNotFound

blueprint = Blueprint("files", __name__)

TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript")


def _naive_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def _utc_ms(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _full(record: FileRecord) -> dict[str, Any]:
    return {
        "name": f"{record.session_id}/{record.id}", "id": record.id, "storage_session_id": record.session_id,
        "session_id": record.session_id, "filename": record.name, "content": None, "size": record.size,
        "lastModified": _naive_iso(record.created), "etag": f'"{record.id}"',
        "metadata": {"content-type": record.content_type, "original-filename": record.name},
        "contentType": record.content_type,
    }  # fmt: skip


def _simple(record: FileRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "path": f"/{record.name}"}


def _summary(record: FileRecord) -> dict[str, Any]:
    return {"name": f"{record.session_id}/{record.id}", "lastModified": _utc_ms(record.created)}


SHAPES = {"simple": _simple, "summary": _summary}


async def _record(session_id: str, file_id: str) -> FileRecord:
    record = await current_deps().catalog.file(current_principal().storage_prefix, session_id, file_id)
    if record is None:
        raise NotFound("File not found")
    return record


@blueprint.get("/files/<session_id>")
@documented(
    "List a session's files",
    tag="files",
    description="`detail=full` (default), `summary` or `simple`. An unknown, expired or foreign session "
    "lists as []. Oldest first; every stored version is listed.",
)
async def list_files(session_id: str) -> Response:
    deps = current_deps()
    session = await deps.catalog.session(current_principal().storage_prefix, session_id)
    if session is None:
        return jsonify([])
    shape = SHAPES.get(request.args.get("detail", "full"), _full)
    return jsonify([shape(record) for record in await deps.catalog.files(session)])


@blueprint.get("/sessions/<session_id>/objects/<file_id>")
@documented("Is this file still there? (its lastModified)", tag="files", errors={404: "File not found"})
async def file_object(session_id: str, file_id: str) -> dict[str, Any]:
    record = await _record(session_id, file_id)
    return {"lastModified": _utc_ms(record.created), "id": record.id, "name": record.name, "size": record.size}


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII fallback and the exact UTF-8 name (RFC 6266 / RFC 5987)."""
    leaf = name.rpartition("/")[2]
    ascii_name = unicodedata.normalize("NFKD", leaf).encode("ascii", "ignore").decode()
    fallback = "".join(c if c.isalnum() or c in "-_." else "_" for c in ascii_name).strip("._") or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(leaf, safe='')}"


@blueprint.get("/download/<session_id>/<file_id>")
@documented("Download a file", tag="files", errors={404: "File not found"})
async def download(session_id: str, file_id: str) -> Response:
    record = await _record(session_id, file_id)
    chunks = current_deps().catalog.read(record, current_principal().storage_prefix)
    try:
        first = await anext(chunks, b"")  # a missing blob is a 404 now, not a broken body later
    except BlobNotFound:
        await chunks.aclose()
        raise NotFound("File content not found") from None
    except BaseException:
        await chunks.aclose()
        raise
    content_type = record.content_type
    if content_type.startswith(TEXT_TYPES) and "charset" not in content_type:
        content_type += "; charset=utf-8"
    headers = {
        "Content-Disposition": content_disposition(record.name),
        "Content-Length": str(record.size),
        "Cache-Control": "private, max-age=3600",
    }
    return Response(_body(first, chunks), status=200, content_type=content_type, headers=headers)


async def _body(first: bytes, chunks: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(chunks):
        if first:
            yield first
        async for chunk in chunks:
            yield chunk


@blueprint.delete("/files/<session_id>/<file_id>")
@documented("Delete a file", tag="files", errors={404: "File not found"})
async def delete_file(session_id: str, file_id: str) -> tuple[str, int]:
    record = await _record(session_id, file_id)
    await current_deps().catalog.delete(current_principal().storage_prefix, record)
    return "", 204
