"""A real small filesystem for full-disk tests: a size-limited tmpfs mounted by the test.

Mounting needs root and mount permission (a container may refuse); tests that need it skip
with the reason when the mount is refused. Every mount is unmounted by its owner.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

CHUNK = 64 * 1024


class SmallDisk:
    def __init__(self, mountpoint: Path) -> None:
        self.path = mountpoint
        self.filler = mountpoint / "filler.bin"

    def fill(self) -> None:
        """Write a filler file until the filesystem refuses more (ENOSPC)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (CHUNK, 4096, 1):
                block = b"\0" * size
                while True:
                    try:
                        os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)

    def free(self, keep_full_but: int | None = None) -> None:
        """Remove the filler, or (``keep_full_but``) shrink it to leave that many bytes."""
        if keep_full_but is None:
            self.filler.unlink(missing_ok=True)
        else:
            size = self.filler.stat().st_size
            os.truncate(self.filler, max(0, size - keep_full_but))

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True,
                       capture_output=True, timeout=30)


def mount_small_disk(mountpoint: Path, size: str) -> SmallDisk:
    """Mount a tmpfs of ``size`` at ``mountpoint``, or skip the test saying why not."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        why = (f"cannot mount a small tmpfs for a real full disk ({result.stderr.strip()}); "
               "these tests need root with mount permission")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(why + " (CI: they must run)", pytrace=False)
        pytest.skip(why)
    return SmallDisk(mountpoint)


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def bind_mount(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True,
                   capture_output=True, timeout=30)
