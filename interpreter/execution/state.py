"""Python state checkpoints in the stores, their generations, archival, and the per-session run lock.

Keys (``<p>`` the owner's prefix):

    state:<p>:<sid>     the checkpoint (opaque bytes from the jail), or ``BLOB`` when it lives in blobs;
                        TTL STATE_TTL_SECONDS from its last save
    gen:<p>:<sid>       the generation: incremented by every checkpoint (DESIGN §4), same TTL
    lock:<p>:<sid>      the run lock: a lease with a random owner token
    ptcbase:<p>:<run>   the checkpoint a paused programmatic run started from (or ``BLOB``)
    blob state/<p>/<sid>            a checkpoint over STATE_MAX_REDIS_SIZE_MB
    blob state-archive/<p>/<sid>    an archived checkpoint (STATE_ARCHIVE_*)
    blob state-ptc/<p>/<run>        a large ``ptcbase``

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


@dataclass
class Lease:
    """A held session lock (``StateStore.acquire``)."""

    name: str
    token: bytes
    local: trio.Semaphore
    released: bool = False

    @property
    def key(self) -> str:
        return f"lock:{self.name}"


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
    _local_locks: dict[str, trio.Semaphore] = field(default_factory=dict, init=False)

    async def generation(self, owner: str, session_id: str) -> int:
        raw = await self.kv.get(f"gen:{owner}:{session_id}")
        return int(raw) if raw and raw.isdigit() else 0

    async def save(self, owner: str, session_id: str, state: bytes) -> int:
        """Store a checkpoint; returns the new generation."""
        await self._put(f"state:{owner}:{session_id}", f"state/{owner}/{session_id}", state, self.ttl_s)
        generation = await self.kv.incr(f"gen:{owner}:{session_id}", ttl_s=self.ttl_s)
        await self.kv.expire(f"gen:{owner}:{session_id}", self.ttl_s)
        return generation

    async def load(self, owner: str, session_id: str) -> bytes | None:
        """The latest checkpoint: from KV, its blob, or the archive; None when there is none."""
        state = await self._get(f"state:{owner}:{session_id}", f"state/{owner}/{session_id}")
        if state is None and self.archive_enabled:
            return await _read_all(self.blobs, f"state-archive/{owner}/{session_id}")
        return state

    async def _put(self, key: str, blob_key: str, state: bytes, ttl_s: float) -> None:
        if len(state) <= self.kv_max_bytes:
            await self.kv.set(key, state, ttl_s=ttl_s)
        else:
            await self.blobs.put(blob_key, _one_chunk(state))
            await self.kv.set(key, BLOB_MARKER, ttl_s=ttl_s)

    async def _get(self, key: str, blob_key: str) -> bytes | None:
        raw = await self.kv.get(key)
        return await _read_all(self.blobs, blob_key) if raw == BLOB_MARKER else raw

    # --- the checkpoint a paused programmatic run started from (DESIGN §4) ---------------------------

    async def pin(self, owner: str, session_id: str, run_id: str, ttl_s: float) -> None:
        """Keep a copy of the session's current checkpoint for ``run_id`` (a replay starts from it)."""
        state = await self.load(owner, session_id)
        if state is not None:
            await self._put(f"ptcbase:{owner}:{run_id}", f"state-ptc/{owner}/{run_id}", state, ttl_s)

    async def pinned(self, owner: str, run_id: str) -> bytes | None:
        return await self._get(f"ptcbase:{owner}:{run_id}", f"state-ptc/{owner}/{run_id}")

    async def extend_pin(self, owner: str, run_id: str, ttl_s: float) -> None:
        await self.kv.expire(f"ptcbase:{owner}:{run_id}", ttl_s)

    async def unpin(self, owner: str, run_id: str) -> None:
        if await self.kv.take(f"ptcbase:{owner}:{run_id}") == BLOB_MARKER:
            await self.blobs.delete(f"state-ptc/{owner}/{run_id}")

    # --- the run lock ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session_lock(self, owner: str, session_id: str, lease_s: float, wait_s: float) -> AsyncIterator[Lease]:
        """Runs of one session one at a time, on this node and across nodes (see ``acquire``)."""
        lease = await self.acquire(owner, session_id, lease_s, wait_s)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def acquire(self, owner: str, session_id: str, lease_s: float, wait_s: float) -> Lease:
        """The session's run lock: a local semaphore (no KV polling between runs of one node) and a KV
        lease with a random token. Any task may release it: a paused programmatic run holds it between
        requests.

        Raises:
            SessionBusy: the session stayed locked for ``wait_s``.
        """
        name = f"{owner}:{session_id}"
        local = self._local_locks.setdefault(name, trio.Semaphore(1))
        lease = Lease(name, secrets.token_bytes(16), local)
        try:
            with trio.fail_after(wait_s):
                await local.acquire()
                try:
                    pause = LOCK_POLL_S[0]
                    while not await self.kv.set_nx(lease.key, lease.token, ttl_s=lease_s):
                        await trio.sleep(pause)
                        pause = min(pause * 2, LOCK_POLL_S[1])
                except BaseException:
                    local.release()
                    raise
        except trio.TooSlowError:
            raise SessionBusy(retry_after_s=2) from None
        return lease

    async def release(self, lease: Lease) -> None:
        """Give the lock back (once; later calls do nothing)."""
        if lease.released:
            return
        lease.released = True
        try:
            with trio.move_on_after(5, shield=True), contextlib.suppress(StoreError):
                await self.kv.delete_if(lease.key, lease.token)
        finally:
            lease.local.release()
            if lease.local.statistics().tasks_waiting == 0 and lease.local.value == 1:
                self._local_locks.pop(lease.name, None)

    async def extend(self, lease: Lease, lease_s: float) -> None:
        """Keep holding the lease for ``lease_s`` from now."""
        await self.kv.expire(lease.key, lease_s)

    async def break_lease(self, owner: str, session_id: str, token: bytes) -> None:
        """Drop a lease held under ``token`` by a run this caller now owns (a paused run from another node)."""
        await self.kv.delete_if(f"lock:{owner}:{session_id}", token)

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
