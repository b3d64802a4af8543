"""Filesystem store: ``file:///abs/dir`` or a plain path.

Atomicity: ``put`` writes a temporary file in the target folder, fsyncs and renames it over the key;
``create`` writes a temporary file and hard-links it to the key (``link`` fails if the key exists,
so exactly one concurrent creator wins and the key never shows partial content). Filesystems
without hard links fall back to ``O_CREAT | O_EXCL``. Resolved paths must stay inside the root.

Temporary files are named ``.tmp-<host>-<pid>-<random>`` (``adapters/tempfiles.py``): ``list`` never
shows them, no key may name one, and ``sweep_temps`` removes those whose writer is gone (killed
mid-write), never a live writer's — the CLI and a server may share one store folder.
"""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

from adapters import tempfiles
from adapters.errors import StoreError
from adapters.sources.base import KeyMissing, check_key, check_prefix

TMP_PREFIX = ".tmp-"
MAX_CHECKED = 1 << 16  # keys ``local_path`` remembers as checked (then it starts again)


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._checked: dict[str, Path] = {}  # ``local_path``'s keys, checked once

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        if any(part.startswith(TMP_PREFIX) for part in check_key(key).split("/")):
            raise StoreError(f"store key {key!r} names a temporary file", reason="bad_key")
        path = self.root / key
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise StoreError(f"store key {key!r} resolves outside the store root", reason="bad_key")
        return path

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` (validated: inside the root), for callers that read it directly and
        verify what they read (the cache: a hash, or the stamp of a file it hashed). Each key is checked
        once per store object: resolving a path walks every folder of it (about 0.25 ms on a cold load
        of 4), and a link swapped in later would give bytes that fail that verification."""
        path = self._checked.get(key)
        if path is None:
            path = self._path(key)
            if len(self._checked) >= MAX_CHECKED:
                self._checked.clear()
            self._checked[key] = path
        return path

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(key) from None
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc}", reason="io_error") from exc

    def get_range(self, key: str, start: int, stop: int) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(start)
                return fh.read(max(0, stop - start))
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(key) from None
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc}", reason="io_error") from exc

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {key}: {exc}", reason="io_error") from exc
        tempfiles.fsync_dir(path.parent)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise StoreError(f"cannot create {key}: {exc}", reason="io_error") from exc
            return _create_exclusive(path, data)
        finally:
            tmp.unlink(missing_ok=True)
        tempfiles.fsync_dir(path.parent)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def modified(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(key) from None
        except OSError as exc:
            raise StoreError(f"cannot stat {key}: {exc}", reason="io_error") from exc

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(check_prefix(prefix)[:-1]) if prefix else self.root
        if not base.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
            rel = Path(dirpath).relative_to(self.root)
            keys.extend((rel / f).as_posix() for f in filenames if not f.startswith(TMP_PREFIX))
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {key}: {exc}", reason="io_error") from exc

    def temp_files(self) -> builtins.list[tempfiles.TempFile]:
        """Temporary files under the root: a live writer's, and stale ones left by killed writers."""
        return tempfiles.find_temps(self.root, TMP_PREFIX)

    def sweep_temps(self) -> builtins.list[Path]:
        """Remove the temporary files of writers that are gone; the paths removed."""
        return tempfiles.sweep(self.root, TMP_PREFIX)

    def _write_temp(self, path: Path, data: bytes) -> Path:
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfiles.make_temp(path.parent, TMP_PREFIX)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write under {path.parent}: {exc}", reason="io_error") from exc
        return tmp


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True
