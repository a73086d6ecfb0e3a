"""DirBlobs: the embedded blob store, a directory under DATA_DIR.

A key is a relative path of plain components (no ``.``/``..``, no NUL, none empty). Writes stream to
a temporary file and are renamed into place, so a blob is never visible half-written. Every path
is walked component by component with ``O_NOFOLLOW`` relative to a directory fd, so a symlink
planted anywhere under the root is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from interpreter.stores.protocols import BlobInfo, BlobNotFound, BlobTooLarge, StoreError

T = TypeVar("T")
CHUNK = 256 * 1024
TMP_DIR = ".tmp"
NAME_MAX = 255
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_key(key: str) -> list[str]:
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..", TMP_DIR) or "\0" in part or len(part.encode()) > NAME_MAX:
            raise StoreError("invalid blob key")
    return parts


class DirBlobs:
    backend = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._limiter = trio.CapacityLimiter(8)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise StoreError(f"blob directory: {os.strerror(exc.errno or errno.EIO)}") from None

    # --- blocking helpers (run in threads) ---------------------------------------------------------

    @contextlib.contextmanager
    def _dir_fd(self, parts: list[str], *, create: bool) -> Iterator[int]:
        """An fd of the directory holding the key's last component, walked without following links."""
        fd = os.open(self.root, DIR_FLAGS)
        try:
            for part in parts[:-1]:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            yield fd
        finally:
            os.close(fd)

    def _open_read(self, key: str) -> int:
        parts = split_key(key)
        try:
            with self._dir_fd(parts, create=False) as directory:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink where a blob should be: not a blob
                raise BlobNotFound(key) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BlobNotFound(key)
        return fd

    def _head(self, key: str) -> BlobInfo | None:
        try:
            fd = self._open_read(key)
        except BlobNotFound:
            return None
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        return BlobInfo(key, info.st_size, info.st_mtime)

    def _publish(self, tmp_name: str, key: str) -> None:
        parts = split_key(key)
        tmp_dir = os.open(self.root / TMP_DIR, DIR_FLAGS)
        try:
            with self._dir_fd(parts, create=True) as directory:
                os.rename(tmp_name, parts[-1], src_dir_fd=tmp_dir, dst_dir_fd=directory)
        finally:
            os.close(tmp_dir)

    def _delete(self, key: str) -> bool:
        parts = split_key(key)
        try:
            with self._dir_fd(parts, create=False) as directory:
                os.unlink(parts[-1], dir_fd=directory)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def _list(self, prefix: str) -> list[BlobInfo]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            relative = os.path.relpath(dirpath, self.root)
            base = "" if relative == "." else relative + "/"
            if base == "":
                dirnames[:] = [name for name in dirnames if name != TMP_DIR]
            # Prune directories that cannot hold a key with this prefix.
            dirnames[:] = [
                d for d in dirnames if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            ]
            for name in filenames:
                key = base + name
                if not key.startswith(prefix):
                    continue
                info = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(info.st_mode):
                    found.append(BlobInfo(key, info.st_size, info.st_mtime))
        return sorted(found, key=lambda blob: blob.key)

    # --- the protocol ---------------------------------------------------------------------------------

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> int:
        split_key(key)
        tmp_name = f"{secrets.token_hex(8)}.part"
        tmp_dir = self.root / TMP_DIR
        fd = await self._thread(
            os.open, tmp_dir / tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        size, published = 0, False
        try:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge(key)
                await self._thread(_write_all, fd, chunk)
            await self._thread(os.fsync, fd)
            await self._thread(self._publish, tmp_name, key)
            published = True
            return size
        finally:
            with trio.move_on_after(5, shield=True):
                await trio.to_thread.run_sync(os.close, fd)
                if not published:
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(os.unlink, tmp_dir / tmp_name)

    async def get(self, key: str) -> AsyncGenerator[bytes, None]:
        fd = await self._thread(self._open_read, key)
        try:
            while chunk := await self._thread(os.read, fd, CHUNK):
                yield chunk
        finally:
            with trio.move_on_after(5, shield=True):
                await trio.to_thread.run_sync(os.close, fd)

    async def head(self, key: str) -> BlobInfo | None:
        return await self._thread(self._head, key)

    async def delete(self, key: str) -> bool:
        return await self._thread(self._delete, key)

    async def list(self, prefix: str) -> list[BlobInfo]:
        return await self._thread(self._list, prefix)

    async def ping(self) -> None:
        await self._thread(os.stat, self.root / TMP_DIR)

    async def aclose(self) -> None:
        return None


def _may_hold(directory: str, prefix: str) -> bool:
    """Whether keys below ``directory`` (ending in /) can start with ``prefix``."""
    return directory.startswith(prefix) or prefix.startswith(directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@asynccontextmanager
async def open_dir_blobs(root: Path) -> AsyncIterator[DirBlobs]:
    """The blob directory at ``root`` (created 0755), with leftovers of interrupted writes removed."""

    def prepare() -> None:
        (root / TMP_DIR).mkdir(mode=0o755, parents=True, exist_ok=True)
        for leftover in (root / TMP_DIR).iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    try:
        await trio.to_thread.run_sync(prepare)
    except OSError as exc:
        raise StoreError(f"blob directory: {exc.strerror}") from None
    yield DirBlobs(root)
