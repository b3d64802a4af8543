"""The disk tier: verified local copies of remote blobs, in front of a remote store (S3)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

from adapters import tempfiles

__all__ = ["DiskTier"]

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # the disk tier's temporary files: .tmp-<host>-<pid>-<random>
LEGACY_TMP_GLOB = ".*.tmp"  # before owner-named temps: .<sha256>.<pid>.<thread id>.tmp
_ENTRY = re.compile(r"[0-9a-f]{64}\.safetensors")


class DiskTier:
    """Verified local copies of remote blobs (``<sha256>.safetensors``), LRU by access time.

    Entry count and bytes are kept as running totals (one directory scan at start-up), so publishing
    metrics never lists the directory. A copy is written to a temporary file that names its writer
    (``.tmp-<host>-<pid>-<random>``, ``adapters/tempfiles.py``) and renamed into place; opening the
    tier removes the temporary files of writers that are gone (a server killed mid-write), and of the
    older ``.<sha256>.<pid>.<thread>.tmp`` names once they are an hour old. A temporary file is never an
    entry: entries are ``<sha256>.safetensors`` names only. Copies are fsynced (file, then folder).
    """

    def __init__(self, root: Path, budget: int) -> None:
        self.root = root
        self.budget = budget
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.sweep_temps():
            log.warning("removed %s, a cache file left half-written by a process that was killed", path)
        files = self._files()
        self.entries = len(files)
        self.nbytes = sum(f.stat().st_size for f in files)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.safetensors"

    def sweep_temps(self) -> list[Path]:
        """Remove stale temporary files (their writer is gone, or an unowned one is an hour old)."""
        removed = tempfiles.sweep(self.root, TMP_PREFIX)
        for path in self.root.glob(LEGACY_TMP_GLOB):  # names without an owner: the age bound only
            if tempfiles.is_stale(path, "."):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _files(self) -> list[Path]:
        return [f for f in self.root.glob("*.safetensors") if _ENTRY.fullmatch(f.name)]

    def write(self, sha256: str, data: bytes) -> int:
        """Store a verified blob; returns how many older copies were evicted to stay in budget.

        Durable like the local store's writes: the bytes are fsynced before the rename, and the folder
        after it, so a power loss leaves the old state or the complete copy."""
        target = self.path(sha256)
        existed = target.exists()
        fd, tmp = tempfiles.make_temp(self.root, TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tempfiles.fsync_dir(self.root)
        if not existed:
            self.entries += 1
            self.nbytes += len(data)
        return self._evict() if self.nbytes > self.budget else 0

    def remove(self, sha256: str) -> None:
        """Drop a copy (one that failed its hash)."""
        path = self.path(sha256)
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self.entries -= 1
            self.nbytes -= size

    def touch(self, sha256: str, mtime_ns: int) -> None:
        """Mark a copy used now: LRU by access time, set here. Its mtime stays ``mtime_ns`` (what it
        was when read): the stamp a verified copy was recorded with must still match it next time."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(sha256), ns=(time.time_ns(), mtime_ns))

    def _evict(self) -> int:
        files = sorted(self._files(), key=lambda f: f.stat().st_atime_ns)
        evicted = 0
        while self.nbytes > self.budget and len(files) > 1:
            victim = files.pop(0)
            size = victim.stat().st_size
            victim.unlink(missing_ok=True)
            self.entries -= 1
            self.nbytes -= size
            evicted += 1
        return evicted
