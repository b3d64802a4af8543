"""Temporary files that name their writer, so a crashed writer's leftovers can be told from a live one's.

A name is ``<prefix><host>-<pid>-<random><suffix>``: ``host`` is 8 hex digits of the hostname's sha256,
``pid`` the writing process. A temporary file is *stale* when its writer is on this host and no longer
runs, or when it is older than ``max_age_s`` whatever its name says (a writer on another host sharing
the folder, a pid reused by an unrelated process, a name without an owner from an older release).
Every writer renames or removes its temporary file within seconds, so the age bound (an hour) never
catches a live one; a live writer's file is never removed by ``sweep``, two processes sharing a folder
(the CLI registering while the server runs) each keep theirs.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STALE_AFTER_S = 3600.0
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OWNER = re.compile(r"^(?P<host>[0-9a-f]{8})-(?P<pid>[1-9][0-9]{0,9})-")


@dataclass(frozen=True)
class TempFile:
    path: Path
    stale: bool


def make_temp(folder: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """``mkstemp`` in ``folder`` with an owner-naming name: (open fd, path)."""
    fd, name = tempfile.mkstemp(prefix=f"{prefix}{HOST}-{os.getpid()}-", suffix=suffix, dir=folder)
    return fd, Path(name)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a name just created, renamed or linked in it survives a power loss (best effort:
    a filesystem that cannot fsync folders is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_stale(path: Path, prefix: str, *, max_age_s: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """Whether ``path`` (a temporary file named with ``prefix``) was left by a writer that is gone."""
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False  # renamed or removed by its writer meanwhile
    if age > max_age_s:
        return True
    match = _OWNER.match(path.name[len(prefix) :])
    if match is None or match["host"] != HOST:
        return False  # unknown owner: only the age bound applies
    return not pid_alive(int(match["pid"]))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts until it is reaped)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    return True


def find_temps(root: Path, prefix: str, *, max_age_s: float = STALE_AFTER_S) -> list[TempFile]:
    """Every temporary file named with ``prefix`` under ``root`` (recursively), stale or not."""
    if not root.is_dir():
        return []
    now = time.time()
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(prefix):
                path = Path(dirpath) / name
                found.append(TempFile(path, is_stale(path, prefix, max_age_s=max_age_s, now=now)))
    return sorted(found, key=lambda t: t.path)


def sweep(root: Path, prefix: str, *, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the stale temporary files under ``root``; the paths removed."""
    removed = []
    for temp in find_temps(root, prefix, max_age_s=max_age_s):
        if temp.stale:
            try:
                temp.path.unlink()
            except FileNotFoundError:
                continue
            except OSError:
                continue  # not ours to remove (permissions): verify reports it
            removed.append(temp.path)
    return removed
