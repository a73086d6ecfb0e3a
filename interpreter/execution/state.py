"""Python state checkpoints in the stores, their generations, archival, and the per-session run lock.

Keys (``<p>`` the owner's prefix):

    state:<p>:<sid>     the checkpoint (opaque bytes from the jail), or ``BLOB`` when it lives in blobs;
                        TTL STATE_TTL_SECONDS from its last save
    gen:<p>:<sid>       the generation: incremented by every checkpoint (DESIGN §4), same TTL
    lock:<p>:<sid>      the run lock: a lease with a random owner token
    blob state/<p>/<sid>            a checkpoint over STATE_MAX_REDIS_SIZE_MB
    blob state-archive/<p>/<sid>    an archived checkpoint (STATE_ARCHIVE_*)

The host never unpickles these bytes: it stores, moves and hands them back to a kernel.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from interpreter.errors import ServiceUnavailable
from interpreter.stores.protocols import KV, BlobNotFound, Blobs, StoreError

log = logging.getLogger("interpreter.state")

BLOB_MARKER = b"\x00blob"
LOCK_POLL_S = (0.005, 0.25)  # first and longest wait between tries of a lock held on another node


class SessionBusy(ServiceUnavailable):
    message = "Another run of this session is still going; retry shortly"


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read_all(blobs: Blobs, key: str) -> bytes | None:
    try:
        async with contextlib.aclosing(blobs.get(key)) as chunks:
            return b"".join([chunk async for chunk in chunks])
    except BlobNotFound:
        return None


@dataclass
class StateStore:
    kv: KV
    blobs: Blobs
    ttl_s: float
    kv_max_bytes: int
    archive_after_s: float
    archive_ttl_s: float
    archive_enabled: bool = True
    _local_locks: dict[str, trio.Lock] = field(default_factory=dict, init=False)

    async def generation(self, owner: str, session_id: str) -> int:
        raw = await self.kv.get(f"gen:{owner}:{session_id}")
        return int(raw) if raw and raw.isdigit() else 0

    async def save(self, owner: str, session_id: str, state: bytes) -> int:
        """Store a checkpoint; returns the new generation."""
        key = f"state:{owner}:{session_id}"
        if len(state) <= self.kv_max_bytes:
            await self.kv.set(key, state, ttl_s=self.ttl_s)
        else:
            await self.blobs.put(f"state/{owner}/{session_id}", _one_chunk(state))
            await self.kv.set(key, BLOB_MARKER, ttl_s=self.ttl_s)
        generation = await self.kv.incr(f"gen:{owner}:{session_id}", ttl_s=self.ttl_s)
        await self.kv.expire(f"gen:{owner}:{session_id}", self.ttl_s)
        return generation

    async def load(self, owner: str, session_id: str) -> bytes | None:
        """The latest checkpoint: from KV, its blob, or the archive; None when there is none."""
        raw = await self.kv.get(f"state:{owner}:{session_id}")
        if raw == BLOB_MARKER:
            return await _read_all(self.blobs, f"state/{owner}/{session_id}")
        if raw is not None:
            return raw
        return await _read_all(self.blobs, f"state-archive/{owner}/{session_id}") if self.archive_enabled else None

    # --- the run lock ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session_lock(self, owner: str, session_id: str, lease_s: float, wait_s: float) -> AsyncIterator[None]:
        """Runs of one session one at a time, on this node (a trio lock) and across nodes (a KV lease).

        Raises:
            SessionBusy: the session stayed locked for ``wait_s``.
        """
        name = f"{owner}:{session_id}"
        local = self._local_locks.setdefault(name, trio.Lock())
        key, token = f"lock:{name}", secrets.token_bytes(16)
        try:
            with trio.fail_after(wait_s):
                await local.acquire()
                try:
                    pause = LOCK_POLL_S[0]
                    while not await self.kv.set_nx(key, token, ttl_s=lease_s):
                        await trio.sleep(pause)
                        pause = min(pause * 2, LOCK_POLL_S[1])
                except BaseException:
                    local.release()
                    raise
        except trio.TooSlowError:
            raise SessionBusy(retry_after_s=2) from None
        try:
            yield
        finally:
            try:
                with trio.move_on_after(5, shield=True), contextlib.suppress(StoreError):
                    await self.kv.delete_if(key, token)
            finally:
                local.release()
                if local.statistics().tasks_waiting == 0:
                    self._local_locks.pop(name, None)

    # --- archival -------------------------------------------------------------------------------------

    async def archive_idle(self, now: float | None = None) -> dict[str, int]:
        """Move checkpoints idle for STATE_ARCHIVE_AFTER_SECONDS to blobs; drop archives past their TTL."""
        moved = expired = 0
        for key in await self.kv.keys("state:"):
            left = await self.kv.ttl(key)
            if left is None or self.ttl_s - left < self.archive_after_s:
                continue
            _, owner, session_id = key.split(":", 2)
            state = await self.load(owner, session_id)
            if state is None:
                continue
            await self.blobs.put(f"state-archive/{owner}/{session_id}", _one_chunk(state))  # refreshes an older one
            await self.kv.delete(key)
            await self.blobs.delete(f"state/{owner}/{session_id}")
            moved += 1
        current = now if now is not None else time.time()
        for blob in await self.blobs.list("state-archive/"):
            if current - blob.modified > self.archive_ttl_s:
                await self.blobs.delete(blob.key)
                expired += 1
        return {"archived": moved, "expired_archives": expired}
