"""Files in runs: what goes into ``/mnt/data`` before a run and what comes out of it after.

In: the session's own files (the newest version of each name) and every file the request refers
to, which wins over a session file of the same name. Out: files the run created or changed,
stored as new files of the session (``modified_from`` names the input an edit came from);
referenced inputs that came back unchanged are echoed as ``inherited``; session files the run
deleted leave the session. Every file that is not mounted or not saved is reported in a note.

Host-side handling is symlink-safe (DESIGN §5): every path is walked one component at a time
from a directory fd with ``O_NOFOLLOW``, only regular files are read, and the walk is bounded.
Blocking file I/O runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mimetypes
import os
import stat
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from interpreter.files.catalog import Catalog, FileRecord, Session
from interpreter.files.names import sanitize_path, unique_name
from interpreter.stores.protocols import BlobNotFound, BlobTooLarge, StoreError
from sandboxes.jail import Identity

log = logging.getLogger("interpreter.files")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 1024 * 1024
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
MAX_WALK_ENTRIES = 10_000
MAX_WALK_DEPTH = 32
NAMES_SHOWN = 5
STAGING_PARALLEL = 8


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int
    max_output_files: int
    max_files_per_session: int
    max_name_bytes: int


@dataclass(frozen=True)
class Ref:
    """A file the request refers to: ``(session id, file id)`` and the name it should have in ``/mnt/data``."""

    session_id: str
    file_id: str
    name: str


@dataclass(frozen=True)
class Mount:
    name: str
    record: FileRecord
    explicit: bool  # referenced by the request (echoed back as inherited when unchanged)


@dataclass(frozen=True)
class Snapshot:
    size: int
    mtime_ns: int
    inode: int


Present = dict[str, tuple[str, Snapshot]]  # name -> (file id, snapshot): what a kept run directory holds


@dataclass(frozen=True)
class Found:
    raw_parts: tuple[str, ...]  # the path as the filesystem spells it, for reopening
    snapshot: Snapshot


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def reply_entry(record: FileRecord, name: str, **extra: Any) -> dict[str, Any]:
    return {"id": record.id, "name": name, "session_id": record.session_id,
            "storage_session_id": record.session_id, **extra}  # fmt: skip


class Workspace:
    """The files of one run. ``files``, ``deleted`` and ``notes`` are filled in by ``collect``."""

    def __init__(self, catalog: Catalog, session: Session, mounts: list[Mount], limits: FileLimits,
                 notes: list[str], own_names: set[str]) -> None:  # fmt: skip
        self.catalog, self.session, self.mounts, self.limits = catalog, session, mounts, limits
        self.notes = notes
        self.own_names = own_names
        self.files: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.present: Present = {}  # after collect: what the run directory holds, for a kernel that keeps it
        self._staged: dict[str, tuple[Mount, Snapshot]] = {}

    # --- in -----------------------------------------------------------------------------------------

    async def stage(self, run_dir: Path, source: str, identity: Identity, present: Present | None = None) -> None:
        """Copy every mount into the run directory.

        ``present`` is what a kept run directory (a live kernel's) already holds from its last run:
        files still current are left in place, files no longer in the session are removed.

        Raises:
            StoreError: the store failed; the run cannot start with its files (503).
        """
        unmounted: dict[str, list[str]] = {}
        limiter = trio.CapacityLimiter(STAGING_PARALLEL)
        present = present or {}
        root = os.open(run_dir, DIR_FLAGS)
        wanted = {mount.name for mount in self.mounts}
        for name in present.keys() - wanted:
            _remove(root, name)

        async def stage(mount: Mount) -> None:
            kept = present.get(mount.name)
            if kept is not None and kept[0] == mount.record.id and _snapshot(root, mount.name) == kept[1]:
                self._staged[mount.name] = (mount, kept[1])
                return
            async with limiter:
                try:
                    snapshot = await self._stage_one(root, mount, identity)
                except BlobNotFound:
                    unmounted.setdefault("its content is missing from storage", []).append(mount.name)
                except OSError as exc:
                    reason = "the run directory is full" if exc.errno == errno.ENOSPC else os.strerror(exc.errno or 0)
                    unmounted.setdefault(reason, []).append(mount.name)
                else:
                    self._staged[mount.name] = (mount, snapshot)

        try:
            async with trio.open_nursery() as nursery:  # a store's latency is paid once, not once per file
                for mount in self.mounts:
                    if mount.name == source:
                        unmounted.setdefault("its name is taken by the program's source file", []).append(mount.name)
                    else:
                        nursery.start_soon(stage, mount)
        finally:
            os.close(root)
        for reason, names in unmounted.items():
            self.notes.append(f"Not mounted in /mnt/data ({reason}): {_listed(sorted(names))}.")

    async def _stage_one(self, root: int, mount: Mount, identity: Identity) -> Snapshot:
        *parents, leaf = mount.name.split("/")
        directory = _open_dirs(root, parents, identity)
        try:
            with contextlib.suppress(FileNotFoundError):  # an older version left by the last run of a kernel
                os.unlink(leaf, dir_fd=directory)
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=directory)  # fmt: skip
            try:
                async with contextlib.aclosing(self.catalog.read(mount.record, self.session.owner)) as chunks:
                    async for chunk in chunks:
                        await trio.to_thread.run_sync(_write_all, fd, chunk)
                if mount.record.read_only:
                    os.fchmod(fd, 0o444)  # owned by a uid outside the jail: the run cannot chmod it back
                else:
                    os.fchown(fd, identity.uid, identity.gid)
                status = os.fstat(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(leaf, dir_fd=directory)
                raise
            finally:
                os.close(fd)
        finally:
            os.close(directory)
        return Snapshot(status.st_size, status.st_mtime_ns, status.st_ino)

    # --- out ----------------------------------------------------------------------------------------

    async def collect(self, run_dir: Path, source: str) -> None:
        """Store what the run created or changed; never raises for a store failure (the run happened)."""
        try:
            found, complete = await trio.to_thread.run_sync(_walk, run_dir, source, self.limits.max_name_bytes)
        except OSError as exc:
            log.error("could not read a run directory", extra={"fields": {"error": exc.strerror}})
            self.notes.append("The files of this run could not be read.")
            return
        if not complete:
            self.notes.append(f"/mnt/data holds more than {MAX_WALK_ENTRIES} entries; the rest were not looked at.")
        outputs: list[tuple[str, Found, Mount | None]] = []
        for name, item in sorted(found.items()):
            staged = self._staged.get(name)
            if staged is not None and staged[1] == item.snapshot:
                self.present[name] = (staged[0].record.id, item.snapshot)
                if staged[0].explicit:
                    self.files.append(reply_entry(staged[0].record, name, inherited=True))
                continue
            outputs.append((name, item, staged[0] if staged else None))
        gone = [(name, mount) for name, (mount, _) in self._staged.items() if name not in found]
        try:
            await self._forget(gone)
            await self._store(run_dir, outputs)
        except StoreError as exc:
            log.error("could not save the files of a run", extra={"fields": {"error": str(exc)}})
            self.notes.append("The files of this run could not be saved: storage is unavailable.")

    async def _forget(self, gone: list[tuple[str, Mount]]) -> None:
        """Files the run deleted: reported, and removed from the session when they were the session's own."""
        for name, mount in gone:
            self.deleted.append(name)
            if mount.record.session_id == self.session.id:
                await self.catalog.delete(self.session.owner, mount.record)
                self.own_names.discard(name)

    async def _store(self, run_dir: Path, outputs: list[tuple[str, Found, Mount | None]]) -> None:
        limits = self.limits
        refused: dict[str, list[str]] = {}
        stored = 0
        for name, item, mount in outputs:
            if stored >= limits.max_output_files:
                refused.setdefault(f"more than MAX_OUTPUT_FILES={limits.max_output_files} files", []).append(name)
                continue
            if item.snapshot.size > limits.max_file_bytes:
                refused.setdefault(f"over MAX_FILE_SIZE_MB={limits.max_file_bytes >> 20}", []).append(name)
                continue
            if name not in self.own_names and len(self.own_names) >= limits.max_files_per_session:
                reason = f"the session already has MAX_FILES_PER_SESSION={limits.max_files_per_session} files"
                refused.setdefault(reason, []).append(name)
                continue
            try:
                record = await self._store_one(run_dir, name, item, mount)
            except (OSError, BlobTooLarge):
                refused.setdefault("it changed while being read", []).append(name)
                continue
            self.own_names.add(name)
            self.present[name] = (record.id, item.snapshot)
            stored += 1
            extra = {"modified_from": record.modified_from} if record.modified_from else {}
            self.files.append(reply_entry(record, name, **extra))
        for reason, names in refused.items():
            self.notes.append(f"Not saved ({reason}): {_listed(names)}.")

    async def _store_one(self, run_dir: Path, name: str, item: Found, mount: Mount | None) -> FileRecord:
        fd = await trio.to_thread.run_sync(_open_regular, run_dir, item.raw_parts)
        try:
            file_id, size = await self.catalog.put_blob(
                self.session, _read_chunks(fd), max_bytes=self.limits.max_file_bytes
            )
        finally:
            os.close(fd)
        modified_from = (
            {"id": mount.record.id, "storage_session_id": mount.record.session_id} if mount is not None else None
        )
        record = FileRecord(
            id=file_id, session_id=self.session.id, name=name, size=size,
            content_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
            original_filename=name, origin="output", modified_from=modified_from,
        )  # fmt: skip
        await self.catalog.add(self.session, record)
        return record


async def plan_workspace(catalog: Catalog, session: Session, refs: Iterable[Ref], limits: FileLimits) -> Workspace:
    """Decide what goes into ``/mnt/data``: the session's newest file of each name, then the refs."""
    own = await catalog.files(session)
    by_name: dict[str, Mount] = {}
    for mine in own:  # oldest first: the newest version of a name wins
        by_name[mine.name] = Mount(mine.name, mine, explicit=False)
    own_by_id = {mine.id: mine for mine in own}
    missing: list[str] = []
    seen: set[tuple[str, str]] = set()
    other_sessions: dict[str, dict[str, FileRecord]] = {}
    for ref in refs:
        if (ref.session_id, ref.file_id) in seen:
            continue
        seen.add((ref.session_id, ref.file_id))
        if ref.session_id == session.id:
            own_record = own_by_id.get(ref.file_id)
            if own_record is None:
                missing.append(ref.name)
            elif by_name[own_record.name].record.id == own_record.id:
                by_name[own_record.name] = replace(by_name[own_record.name], explicit=True)
            continue  # an older version of a name: the session's newest is what the run sees
        if ref.session_id not in other_sessions:  # one listing per session referred to, not one call per ref
            other = await catalog.session(session.owner, ref.session_id)
            other_sessions[ref.session_id] = {r.id: r for r in await catalog.files(other)} if other else {}
        record = other_sessions[ref.session_id].get(ref.file_id)
        if record is None:
            missing.append(ref.name)
            continue
        name = sanitize_path(ref.name or record.name, max_bytes=limits.max_name_bytes)
        if name not in by_name or not by_name[name].explicit:  # the first ref of a name wins
            by_name[name] = Mount(name, record, explicit=True)
    notes = [f"Not mounted in /mnt/data (not found or expired): {_listed(missing)}."] if missing else []
    mounts = list(by_name.values())
    if len(mounts) > limits.max_files_per_session:
        dropped = [mount.name for mount in mounts[limits.max_files_per_session :]]
        notes.append(f"Not mounted (more than MAX_FILES_PER_SESSION={limits.max_files_per_session}): "
                     f"{_listed(dropped)}.")  # fmt: skip
        mounts = mounts[: limits.max_files_per_session]
    return Workspace(catalog, session, mounts, limits, notes, {mine.name for mine in own})


# --- blocking helpers (run in worker threads, or cheap enough for the loop) -----------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_dirs(root: int, parts: list[str], identity: Identity | None) -> int:
    """A new fd of ``root/parts...``, no links followed; with an ``identity``, missing directories are
    created (owned by the sandbox user)."""
    fd = os.dup(root)
    try:
        for part in parts:
            if identity is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, identity.uid, identity.gid, dir_fd=fd, follow_symlinks=False)
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _snapshot(root: int, name: str) -> Snapshot | None:
    """The snapshot of the regular file ``name`` under ``root`` (links not followed), or None."""
    *parents, leaf = name.split("/")
    try:
        directory = _open_dirs(root, parents, None)
    except OSError:
        return None
    try:
        info = os.stat(leaf, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(directory)
    return Snapshot(info.st_size, info.st_mtime_ns, info.st_ino) if stat.S_ISREG(info.st_mode) else None


def _remove(root: int, name: str) -> None:
    """Unlink ``name`` under ``root`` if it is there (links not followed; a directory is left alone)."""
    *parents, leaf = name.split("/")
    with contextlib.suppress(OSError):
        directory = _open_dirs(root, parents, None)
        try:
            os.unlink(leaf, dir_fd=directory)
        finally:
            os.close(directory)


def _open_regular(run_dir: Path, parts: tuple[str, ...]) -> int:
    """An fd of a regular file under ``run_dir``, reached without following any link."""
    directory = os.open(run_dir, DIR_FLAGS)
    try:
        for part in parts[:-1]:
            child = os.open(part, DIR_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = child
        fd = os.open(parts[-1], READ_FLAGS, dir_fd=directory)
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


async def _read_chunks(fd: int) -> AsyncIterator[bytes]:
    offset = 0
    while chunk := await trio.to_thread.run_sync(os.pread, fd, CHUNK, offset):
        offset += len(chunk)
        yield chunk


def _walk(run_dir: Path, source: str, max_name_bytes: int) -> tuple[dict[str, Found], bool]:
    """Every regular file under ``run_dir`` by sanitised name, without following links.

    Skipped: hidden names, ``__pycache__`` and ``node_modules``, the program's own source file.
    Returns (found, complete): the walk stops after MAX_WALK_ENTRIES entries.
    """
    found: dict[str, Found] = {}
    taken: set[str] = set()
    entries = 0
    pending: list[tuple[int, tuple[str, ...]]] = [(os.open(run_dir, DIR_FLAGS), ())]
    try:
        while pending:
            fd, prefix = pending.pop()
            try:
                with os.scandir(fd) as listing:
                    for entry in listing:
                        entries += 1
                        if entries > MAX_WALK_ENTRIES:
                            return found, False
                        if entry.name.startswith(".") or (not prefix and entry.name == source):
                            continue
                        info = entry.stat(follow_symlinks=False)
                        path = (*prefix, entry.name)
                        if stat.S_ISDIR(info.st_mode):
                            if entry.name not in SKIPPED_DIRS and len(path) < MAX_WALK_DEPTH:
                                pending.append((os.open(entry.name, DIR_FLAGS, dir_fd=fd), path))
                        elif stat.S_ISREG(info.st_mode):
                            readable = "/".join(p.encode(errors="surrogateescape").decode(errors="replace")
                                                for p in path)  # fmt: skip
                            name = unique_name(sanitize_path(readable, max_bytes=max_name_bytes), taken)
                            found[name] = Found(path, Snapshot(info.st_size, info.st_mtime_ns, info.st_ino))
            finally:
                os.close(fd)
        return found, True
    finally:
        for fd, _ in pending:
            os.close(fd)
