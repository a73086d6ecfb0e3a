"""Sessions and their files, owned by a principal, kept in the KV and blob stores (DESIGN §4).

Keys (``<p>`` is the owner's storage prefix, a hash of the principal id, DESIGN §9):

    sess:<p>:<sid>                  the session (JSON); expires SESSION_TTL_HOURS after its last use
    files:<p>:<sid>                 a hash: file id → the file's metadata (JSON); one call lists a session
    link:<p>:<rule>:<digest>        runtime_session_hint or entity_id (per user) → session id; same TTL,
                                    so links expire by themselves
    live:<sid>                      ``<p>`` for every session created: how the cleanup finds expired ones
    blob  sessions/<p>/<sid>/<fid>  a file's bytes

Writes go in an order that makes every failure harmless: the session, then its ``live:`` entry,
then a file's blob (visible only once complete), then its metadata. A file exists for readers only
when its metadata does and its session is alive, so nothing half-written is ever visible; what a
failure leaves behind is removed by ``sweep``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import trio

from interpreter.ids import is_id, new_id
from interpreter.stores.protocols import KV, Blobs, StoreError

log = logging.getLogger("interpreter.files")

SessionKind = Literal["exec", "upload"]
LinkRule = Literal["hint", "entity"]
BLOB_ROOT = "sessions/"
CLEANUP_S = 10
ORPHAN_GRACE_S = 3600  # a blob younger than this may be an upload whose metadata is still to come


@dataclass(frozen=True)
class Session:
    id: str
    owner: str
    kind: SessionKind
    user_id: str | None = None
    entity_id: str | None = None
    created: float = field(default_factory=time.time)


@dataclass(frozen=True)
class FileRecord:
    id: str
    session_id: str
    name: str  # the sanitised path under /mnt/data
    size: int
    content_type: str
    original_filename: str
    origin: Literal["upload", "output"]
    created: float = field(default_factory=time.time)
    read_only: bool = False
    modified_from: dict[str, str] | None = None


def _load(cls: type[Any], raw: bytes | None) -> Any:
    """A record written by us, or None when absent or unreadable (treated as absent)."""
    if raw is None:
        return None
    try:
        return cls(**json.loads(raw))
    except (ValueError, TypeError):
        log.warning("unreadable record ignored", extra={"fields": {"type": cls.__name__}})
        return None


def _dump(record: Session | FileRecord) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class Catalog:
    """Every read and write of sessions and files. ``owner`` is ``Principal.storage_prefix``."""

    def __init__(self, kv: KV, blobs: Blobs, *, ttl_s: float) -> None:
        self.kv, self.blobs, self.ttl_s = kv, blobs, ttl_s

    # --- sessions -----------------------------------------------------------------------------------

    async def create_session(
        self, owner: str, kind: SessionKind, *, user_id: str | None = None, entity_id: str | None = None
    ) -> Session:
        session = Session(new_id(), owner, kind, user_id, entity_id)
        await self.kv.set(f"sess:{owner}:{session.id}", _dump(session), ttl_s=self.ttl_s)
        await self.kv.set(f"live:{session.id}", owner.encode())
        return session

    async def session(self, owner: str, session_id: object) -> Session | None:
        """The owner's live session, or None (unknown, expired, malformed or someone else's)."""
        if not is_id(session_id):
            return None
        found: Session | None = _load(Session, await self.kv.get(f"sess:{owner}:{session_id}"))
        return found if found is not None and found.owner == owner else None

    async def touch(self, session: Session) -> None:
        """Restart the session's time to live: it expires SESSION_TTL_HOURS after its last use."""
        await self.kv.expire(f"sess:{session.owner}:{session.id}", self.ttl_s)

    async def linked(self, owner: str, rule: LinkRule, user_id: str | None, value: str) -> Session | None:
        raw = await self.kv.get(f"link:{owner}:{rule}:{_digest(user_id or '', value)}")
        return await self.session(owner, raw.decode(errors="replace")) if raw else None

    async def link(self, session: Session, rule: LinkRule, value: str) -> None:
        key = f"link:{session.owner}:{rule}:{_digest(session.user_id or '', value)}"
        await self.kv.set(key, session.id.encode(), ttl_s=self.ttl_s)

    # --- files --------------------------------------------------------------------------------------

    async def files(self, session: Session) -> list[FileRecord]:
        """Every file of the session, oldest first."""
        found = await self.kv.hgetall(f"files:{session.owner}:{session.id}")
        records = [record for raw in found.values() if (record := _load(FileRecord, raw)) is not None]
        return sorted((r for r in records if r.session_id == session.id), key=lambda r: (r.created, r.id))

    async def file(self, owner: str, session_id: object, file_id: object) -> FileRecord | None:
        session = await self.session(owner, session_id)
        if session is None or not is_id(file_id):
            return None
        record: FileRecord | None = _load(FileRecord, await self.kv.hget(f"files:{owner}:{session.id}", file_id))
        return record if record is not None and record.session_id == session.id else None

    @staticmethod
    def blob_key(owner: str, session_id: str, file_id: str) -> str:
        return f"{BLOB_ROOT}{owner}/{session_id}/{file_id}"

    async def put_blob(self, session: Session, chunks: AsyncIterable[bytes], *, max_bytes: int) -> tuple[str, int]:
        """Store a new file's bytes under a fresh id (invisible until ``add``). Returns (id, size).

        Raises:
            BlobTooLarge: over ``max_bytes``; nothing was stored.
        """
        file_id = new_id()
        size = await self.blobs.put(self.blob_key(session.owner, session.id, file_id), chunks, max_bytes=max_bytes)
        return file_id, size

    async def add(self, session: Session, record: FileRecord) -> None:
        """Make a stored blob visible as a file; on failure the blob is removed (best effort) and the error raised."""
        try:
            await self.kv.hset(f"files:{session.owner}:{session.id}", record.id, _dump(record))
        except BaseException:
            await self.discard_blobs(session, [record.id])
            raise

    async def discard_blobs(self, session: Session, file_ids: list[str]) -> None:
        """Remove blobs that never became files (a failed or refused upload); the sweep gets any left over."""
        with trio.move_on_after(CLEANUP_S, shield=True):
            for file_id in file_ids:
                with contextlib.suppress(StoreError):
                    await self.blobs.delete(self.blob_key(session.owner, session.id, file_id))

    def read(self, record: FileRecord, owner: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes (iterate inside ``contextlib.aclosing``); ``BlobNotFound`` when the blob is gone."""
        return self.blobs.get(self.blob_key(owner, record.session_id, record.id))

    async def delete(self, owner: str, record: FileRecord) -> None:
        """Metadata first, so the file disappears at once; then its bytes."""
        await self.kv.hdel(f"files:{owner}:{record.session_id}", record.id)
        await self.blobs.delete(self.blob_key(owner, record.session_id, record.id))

    # --- cleanup ------------------------------------------------------------------------------------

    async def sweep(self, *, orphans: bool, now: float | None = None) -> dict[str, int]:
        """Remove the files of expired sessions; with ``orphans``, also blobs that have no metadata."""
        removed = {"sessions": 0, "files": 0, "orphan_blobs": 0, "expired_keys": await self.kv.purge_expired()}
        for live_key in await self.kv.keys("live:"):
            session_id = live_key.removeprefix("live:")
            raw_owner = await self.kv.get(live_key)
            if raw_owner is None:
                continue
            owner = raw_owner.decode(errors="replace")
            if await self.kv.get(f"sess:{owner}:{session_id}") is not None:
                continue
            await self.kv.delete(f"files:{owner}:{session_id}")
            for blob in await self.blobs.list(f"{BLOB_ROOT}{owner}/{session_id}/"):
                await self.blobs.delete(blob.key)
                removed["files"] += 1
            await self.kv.delete(live_key)
            removed["sessions"] += 1
        if orphans:
            removed["orphan_blobs"] = await self._sweep_orphans(now if now is not None else time.time())
        return removed

    async def _sweep_orphans(self, now: float) -> int:
        removed = 0
        known: dict[str, dict[str, bytes]] = {}  # one listing per session, not one call per blob
        for blob in await self.blobs.list(BLOB_ROOT):
            if now - blob.modified < ORPHAN_GRACE_S:
                continue
            owner, _, rest = blob.key.removeprefix(BLOB_ROOT).partition("/")
            session_id, _, file_id = rest.partition("/")
            files_key = f"files:{owner}:{session_id}"
            if files_key not in known:
                known[files_key] = await self.kv.hgetall(files_key)
            if file_id not in known[files_key]:
                await self.blobs.delete(blob.key)
                removed += 1
        return removed
