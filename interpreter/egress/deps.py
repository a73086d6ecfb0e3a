"""Package caches per tenant (SKILL_DEPS_PATH): what one principal installs, only that principal imports.

Each principal (by its storage prefix) gets a filesystem image of SKILL_DEPS_MAX_MB, created on its
first run with the network on and loop-mounted ``nosuid,nodev`` on the host; its jails get that
mount, and only that one, read-write at /opt/skill-deps. The image is the cap: a full cache is the
installer's ENOSPC, never the host's disk. The host never walks a tree a sandbox wrote into in order
to enforce anything (usage is ``statvfs``; purging is an unmount and an unlink), so no planted link
is ever followed. Jails of one principal run as different uids, so they write with umask 0 (set in
the jail) and every tenant's run can extend what its earlier runs installed.

Layout under SKILL_DEPS_PATH (0711 directories: jails bind from here, nobody lists it):
``images/<key>.img`` and ``images/<key>.principal`` (the prefix, for the admin API), ``mounts/<key>``.
``key`` is a keyed hash of the prefix, so other local users cannot even name a tenant's cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from sandboxes.host import take_instance_lock, unmount

log = logging.getLogger("interpreter.egress")

ECOSYSTEMS = ("python", "node", "go", "cargo")  # the top directories the admin API reports
TOP_DIRS = ("python", "node", "go", "cargo", "cache")
MIN_MIB = 16
SALT_BYTES = 32
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20  # <linux/posix_acl.h>
# By absolute path: the server's PATH (a shell's, a unit's) may lack the sbin directories.
MOUNT, LOSETUP, MKFS, E2FSCK, RESIZE2FS = (
    "/bin/mount",
    "/sbin/losetup",
    "/sbin/mkfs.ext4",
    "/sbin/e2fsck",
    "/sbin/resize2fs",
)
TOOLS = (MOUNT, LOSETUP, MKFS, E2FSCK, RESIZE2FS)


class DepsError(Exception):
    """A principal's cache could not be made ready (no loop devices, mkfs missing, disk full)."""


@dataclass(frozen=True)
class DepsLayout:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def mounts(self) -> Path:
        return self.root / "mounts"


class SkillDeps:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.layout = DepsLayout(root)
        self.max_bytes = max_bytes
        self._locks: dict[str, trio.Lock] = {}
        self._mounted: dict[str, Path] = {}  # by key: what ensure found or made, until a purge
        self._salt = b""

    def prepare(self) -> int:
        """The directories and the salt (blocking; at start). Returns the fd of the lock held for the life of
        the process: one server per SKILL_DEPS_PATH, or two would mount the same images.

        Raises:
            HostError: another server holds the lock.
        """
        for directory in (self.layout.root, self.layout.images, self.layout.mounts):
            directory.mkdir(mode=0o711, parents=True, exist_ok=True)
            directory.chmod(0o711)
        lock = take_instance_lock(self.layout.root / ".lock")
        salt = self.layout.root / ".salt"
        if not salt.is_file() or salt.stat().st_size != SALT_BYTES:  # (a crash never leaves a short one)
            fresh = salt.with_suffix(".new")
            fresh.unlink(missing_ok=True)
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(SALT_BYTES))
                os.fsync(file.fileno())
            fresh.replace(salt)
        self._salt = salt.read_bytes()
        return lock

    def restrict_to(self, uids: list[int]) -> None:
        """Only root and the sandboxes' uids may pass through ``mounts/`` (nsjail binds a cache as the jail's
        uid, so it needs search permission there): a POSIX ACL, since those uids share no group. Without
        ACL support it stays 0711 (then other local users could reach a cache by its name), and says so."""
        mounts = self.layout.mounts
        undefined = 0xFFFFFFFF
        entries = [(ACL_USER_OBJ, 7, undefined), *[(ACL_USER, 1, uid) for uid in sorted(set(uids))],
                   (ACL_GROUP_OBJ, 0, undefined), (ACL_MASK, 1, undefined), (ACL_OTHER, 0, undefined)]  # fmt: skip
        acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
        try:
            os.setxattr(mounts, "system.posix_acl_access", acl)
        except OSError as exc:
            mounts.chmod(0o711)
            log.warning("SKILL_DEPS_PATH has no ACLs: other local users can reach a package cache by its name",
                        extra={"fields": {"error": exc.strerror}})  # fmt: skip

    def key(self, prefix: str) -> str:
        return hashlib.sha256(self._salt + prefix.encode()).hexdigest()[:32]

    async def ensure(self, prefix: str) -> Path:
        """The principal's cache, mounted (made on first use). Raises DepsError."""
        key = self.key(prefix)
        if (mount := self._mounted.get(key)) is not None:  # every run with the network asks: no thread, no I/O
            return mount
        async with self._locks.setdefault(key, trio.Lock()):
            try:
                mount = await trio.to_thread.run_sync(self._ensure, key, prefix)
                self._mounted[key] = mount
                return mount
            except (OSError, subprocess.SubprocessError) as exc:
                output = getattr(exc, "stderr", None) or b""
                error = f"{exc} {output.decode(errors='replace')}"[:500]
                log.error("a package cache could not be mounted", extra={"fields": {"error": error}})
                raise DepsError(error) from None

    def _ensure(self, key: str, prefix: str) -> Path:
        image, mount = self.layout.images / f"{key}.img", self.layout.mounts / key
        if mount.is_dir() and os.path.ismount(mount):
            return mount
        fresh = not image.exists()
        if fresh:
            disk = os.statvfs(self.layout.images)
            if disk.f_bavail * disk.f_frsize < self.max_bytes:  # (images are sparse: this bounds new ones only)
                raise OSError(f"less than SKILL_DEPS_MAX_MB free under SKILL_DEPS_PATH for a new cache ({key})")
            partial = image.with_suffix(".new")
            partial.unlink(missing_ok=True)  # (a crash's leftover)
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as file:
                file.truncate(self.max_bytes)  # sparse: only what is written takes disk space
            _run([MKFS, "-q", "-F", "-m", "0", "-i", "8192", "-J", "size=4",
                  "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", str(partial)])  # fmt: skip
            (self.layout.images / f"{key}.principal").write_text(prefix)
            partial.rename(image)
        elif image.stat().st_size < self.max_bytes:
            self._grow(image)
        mount.mkdir(mode=0o700, exist_ok=True)
        _run([MOUNT, "-o", "loop,nosuid,nodev,noatime", str(image), str(mount)])
        if fresh:
            log.info("package cache created", extra={"fields": {"principal": prefix, "bytes": self.max_bytes}})
            for name in TOP_DIRS:
                (mount / name).mkdir(exist_ok=True)
                (mount / name).chmod(0o777)
            (mount / "lost+found").rmdir()
        mount.chmod(0o777)  # (the mounted filesystem's root) any uid of the principal's jails writes here
        return mount

    def _grow(self, image: Path) -> None:
        """SKILL_DEPS_MAX_MB was raised since the image was made: it grows before it is mounted (online growth
        needs CAP_SYS_RESOURCE, which a hardened host may not give). A lowered cap applies to caches made, or
        purged, afterwards."""
        attached = subprocess.run([LOSETUP, "-j", str(image)], capture_output=True, text=True, timeout=60)
        if attached.returncode != 0 or attached.stdout.strip():
            log.warning("a package cache still in use elsewhere was not grown")  # (a lazily unmounted one)
            return
        with open(image, "r+b") as file:
            file.truncate(self.max_bytes)
        checked = subprocess.run([E2FSCK, "-f", "-p", str(image)], capture_output=True, timeout=300)
        if checked.returncode > 1:  # 1: errors corrected (an unclean unmount's journal replayed)
            raise subprocess.CalledProcessError(checked.returncode, checked.args, checked.stdout, checked.stderr)
        _run([RESIZE2FS, str(image)])
        log.info("package cache grown", extra={"fields": {"bytes": self.max_bytes}})

    # --- what admins see and do ----------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """Per principal: used bytes (statvfs when mounted, else the image's allocated size) and, when mounted,
        per ecosystem (a walk that follows no links). Blocking."""
        report = empty_usage()
        principals, ecosystems = report["principals"], report["ecosystems"]
        for image in sorted(self.layout.images.glob("*.img")):
            key, mount = image.stem, self.layout.mounts / image.stem
            try:
                info = image.stat()
                prefix = (self.layout.images / f"{key}.principal").read_text().strip()
                mounted = os.path.ismount(mount)
                if mounted:
                    stats = os.statvfs(mount)
                    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
                    for name in ECOSYSTEMS:
                        size = _tree_bytes(mount / name)
                        ecosystems[name]["exists"] = ecosystems[name]["exists"] or size is not None
                        ecosystems[name]["bytes"] += size or 0
                else:
                    used = info.st_blocks * 512
            except OSError:
                continue  # purged meanwhile
            report["total_bytes"] += used
            principals.append({"principal_prefix": prefix, "limit_bytes": info.st_size, "used_bytes": used,
                               "mounted": mounted})  # fmt: skip
        return report

    async def purge(self, prefix: str | None) -> dict[str, object]:
        """Remove one principal's cache (or all). Jails using it keep it until they end; the next run of the
        principal gets a fresh one."""
        keys = [self.key(prefix)] if prefix is not None else [image.stem for image in self.layout.images.glob("*.img")]
        freed, errors, purged = 0, [], 0
        for key in keys:
            async with self._locks.setdefault(key, trio.Lock()):
                self._mounted.pop(key, None)  # the next run mounts it again (a fresh one)
                try:
                    size = await trio.to_thread.run_sync(self._purge, key)
                except OSError as exc:
                    errors.append(f"{key}: {exc.strerror or exc}")
                    continue
            if size is not None:
                freed, purged = freed + size, purged + 1
        return {"purged": not errors, "path": str(self.layout.root), "principals": purged, "freed_bytes": freed,
                "errors": errors}  # fmt: skip

    def _purge(self, key: str) -> int | None:
        image, mount = self.layout.images / f"{key}.img", self.layout.mounts / key
        if not image.exists():
            return None
        size = image.stat().st_blocks * 512
        unmount(mount)  # lazy: jails that have it keep it; the loop device goes with the last of them
        if mount.exists():
            mount.rmdir()
        image.unlink()
        (self.layout.images / f"{key}.principal").unlink(missing_ok=True)
        return size

    def unmount_all(self) -> None:
        """At shutdown (blocking): every cache unmounted (lazily), images kept for the next start."""
        self._mounted.clear()
        for mount in self.layout.mounts.iterdir():
            try:
                unmount(mount)
            except OSError as exc:
                log.warning("a package cache could not be unmounted", extra={"fields": {"error": exc.strerror}})


def empty_usage() -> dict[str, Any]:
    """What ``SkillDeps.usage`` reports when there is no cache."""
    return {"principals": [], "ecosystems": {name: {"exists": False, "bytes": 0} for name in ECOSYSTEMS},
            "total_bytes": 0}  # fmt: skip


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _tree_bytes(top: Path) -> int | None:
    """Allocated bytes below ``top`` (None if it does not exist). ``os.fwalk`` holds each directory open and
    never follows a link, even one swapped in while it walks; the walk stays on ``top``'s filesystem."""
    try:
        device = top.lstat().st_dev
    except OSError:
        return None
    total = 0
    for _, directories, files, fd in os.fwalk(top, follow_symlinks=False):
        for name in (*directories, *files):
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if info.st_dev == device:
                total += info.st_blocks * 512
    return total
