"""Package caches on the host, without a server: images made, capped, grown, purged; nothing followed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from interpreter.egress.deps import DepsError, SkillDeps
from sandboxes.host import unmount
from tests.conftest import open_dir

MIB = 1024 * 1024


@pytest.fixture
def root() -> Iterator[Path]:
    directory = open_dir("interp-deps-unit-")
    try:
        yield directory
    finally:
        for mount in (directory / "mounts").glob("*"):
            unmount(mount)
        shutil.rmtree(directory, ignore_errors=True)


def fill(directory: Path) -> int:
    """Write until the filesystem is full; the bytes written."""
    written = 0

    def write_until_full() -> None:
        nonlocal written
        with open(directory / "fill", "wb") as file:
            while True:
                file.write(b"\0" * MIB)
                file.flush()
                written += MIB

    with pytest.raises(OSError, match="No space left on device"):
        write_until_full()
    (directory / "fill").unlink()
    return written


async def test_a_cache_is_capped_grows_when_the_cap_grows_and_is_purged(root: Path) -> None:
    small = SkillDeps(root, 16 * MIB)
    lock = small.prepare()
    mount = await small.ensure("0123456789abcdef")
    assert sorted(p.name for p in mount.iterdir()) == ["cache", "cargo", "go", "node", "python"]
    assert oct(mount.stat().st_mode & 0o777) == "0o777"
    assert fill(mount / "cache") < 16 * MIB  # the image is the cap
    small.unmount_all()
    os.close(lock)

    larger = SkillDeps(root, 48 * MIB)  # SKILL_DEPS_MAX_MB raised, the server restarted
    lock = larger.prepare()
    mount = await larger.ensure("0123456789abcdef")
    assert 32 * MIB < fill(mount / "cache") < 48 * MIB
    (mount / "python" / "kept.py").write_text("x = 1\n")
    other = await larger.ensure("fedcba9876543210")
    assert other != mount
    assert not (other / "python" / "kept.py").exists()  # each principal its own filesystem
    usage = larger.usage()
    assert sorted(p["principal_prefix"] for p in usage["principals"]) == ["0123456789abcdef", "fedcba9876543210"]
    purged = await larger.purge("0123456789abcdef")
    assert purged["principals"] == 1
    assert not (mount / "python" / "kept.py").exists()  # unmounted (the mount point itself is gone too)
    again = await larger.ensure("0123456789abcdef")
    assert not (again / "python" / "kept.py").exists()  # a fresh cache
    everything = await larger.purge(None)
    assert everything["principals"] == 2
    assert list((root / "images").iterdir()) == []
    os.close(lock)


async def test_the_host_never_follows_a_link_planted_in_a_cache(root: Path) -> None:
    deps = SkillDeps(root, 16 * MIB)
    lock = deps.prepare()
    mount = await deps.ensure("0123456789abcdef")
    outside = open_dir("interp-deps-outside-")
    try:
        (outside / "big").write_bytes(b"\0" * 4 * MIB)
        (mount / "python" / "escape").symlink_to(outside)
        (mount / "node" / "loop").symlink_to(mount / "node")
        usage = deps.usage()
        assert usage["ecosystems"]["python"]["bytes"] < MIB  # the 4 MiB outside were not counted
        await deps.purge(None)
        assert (outside / "big").exists()  # purging unlinks the image; it never walks the tree
    finally:
        shutil.rmtree(outside, ignore_errors=True)
        os.close(lock)


async def test_only_the_sandboxes_uids_can_reach_a_cache(root: Path) -> None:
    """Other local users cannot pass through mounts/ (the caches inside are writable by every jail uid)."""
    sandbox_uid, stranger = 41234, 41299
    deps = SkillDeps(root, 16 * MIB)
    lock = deps.prepare()
    deps.restrict_to([sandbox_uid])
    mount = await deps.ensure("0123456789abcdef")

    def listing_as(uid: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "ls", str(mount)],
                              capture_output=True, text=True, check=False)  # fmt: skip

    try:
        assert listing_as(sandbox_uid).stdout.split() == ["cache", "cargo", "go", "node", "python"]
        refused = listing_as(stranger)
        assert refused.returncode != 0
        assert "Permission denied" in refused.stderr
        assert oct((root / "images").stat().st_mode & 0o777) == "0o711"
        assert all(oct(image.stat().st_mode & 0o777) == "0o600" for image in (root / "images").glob("*.img"))
    finally:
        os.close(lock)


async def test_no_new_cache_when_the_disk_could_not_hold_it(root: Path) -> None:
    deps = SkillDeps(root, 1 << 50)  # a petabyte per principal
    lock = deps.prepare()
    try:
        with pytest.raises(DepsError, match="free under SKILL_DEPS_PATH"):
            await deps.ensure("0123456789abcdef")
        assert list((root / "images").iterdir()) == []
    finally:
        os.close(lock)
