"""A cold load's file read on a second thread, while the caller works on the header it already has.

``ReadAhead.open`` opens a file and takes a buffer of its size (``fstat`` only, on the caller's thread).
``OpenFile.read_head`` reads the safetensors header (8 bytes and the length they declare) into that
buffer on the caller's thread; ``hand_over`` gives the rest of the file to one of the reader's threads,
which reads it and then hashes it (``verify``). ``preadv`` and BLAKE3 release the GIL, so on a
second core the data arrives while the caller parses the header, makes the views and checks the names.
A caller with nothing to parse (a header known to pass) keeps a share of the bytes to read itself
(``read_kept``): two copies out of the page cache at a time. The caller reads no value before
``wait_read`` returns, and ``finish`` raises the reader's error before the caller's own: a file whose
bytes are not the ones registered is ``AdapterCorrupt``, whatever else its header got wrong.

Every byte the caller checks is a byte of the buffer, and the buffer is what is hashed: the header is
read into it, not beside it.

The reader reads its share in one call: a thread that needs the GIL back (after each piece of a read in
pieces) waits up to the interpreter's switch interval (5 ms) for it while the caller runs Python, which
made an SDXL load 1.5x slower, not faster.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from io import FileIO
from pathlib import Path

import torch

from adapters.buffers import BufferPool
from adapters.errors import AdapterCorrupt
from adapters.views import Stamp, new_buffer

__all__ = ["OpenFile", "ReadAhead"]


class ReadAhead:
    """Reader threads shared by every cold load of one cache (two: one load's read, the next's)."""

    def __init__(self, workers: int = 2) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraswap-read")

    def open(self, path: Path, *, pin: bool = False, pool: BufferPool | None = None) -> OpenFile | None:
        """``path`` opened with a buffer of its size (page-locked if ``pin``, else from ``pool`` when
        given) and its stamp; None when it does not exist. Nothing is read yet."""
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115  # closed by the worker (or on error here)
        except FileNotFoundError:
            return None
        try:
            info = os.fstat(fh.fileno())
            buffer = new_buffer(info.st_size, pin=pin, pool=pool)
        except BaseException:
            fh.close()
            raise
        return OpenFile(path, fh, buffer, (info.st_ino, info.st_size, info.st_mtime_ns), self._executor)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)


class OpenFile:
    """One file being read into ``buffer``: ``read_head``, ``hand_over``, (``read_kept``, ``wait_read``),
    then ``finish``."""

    def __init__(
        self, path: Path, fh: FileIO, buffer: torch.Tensor, stamp: Stamp, executor: ThreadPoolExecutor
    ) -> None:
        self.path = path
        self.buffer = buffer
        self.stamp = stamp
        self.head_end = 0
        self._fh = fh
        self._view = memoryview(buffer.numpy())  # type: ignore[arg-type]  # ndarray: buffer protocol
        self._executor = executor
        self._read = threading.Event()
        self._kept = threading.Event()
        self._kept_bytes = 0  # what the caller keeps to read itself (``read_kept``)
        self._kept_got: int | None = None  # what it read (None: it gave up before reading)
        self._job: Future[None] | None = None

    def read_head(self, *, max_header_bytes: int) -> None:
        """Read the header (8 bytes and the length they declare) into the buffer, here.

        A header length past ``max_header_bytes`` or past the file is read whole here (the caller's
        header checks then refuse it as they would any such file)."""
        size = len(self._view)
        try:
            got = _pread_into(self._fh, self._view, 0, min(size, 8))
            declared = int.from_bytes(self._view[:8], "little") if got == 8 else size
            head_end = 8 + declared if declared <= max_header_bytes and 8 + declared <= size else size
            self.head_end = got + _pread_into(self._fh, self._view, got, head_end)
        except BaseException:
            self.discard()
            raise

    def hand_over(self, verify: Callable[[torch.Tensor], None] | None, *, keep: int = 0) -> None:
        """Read the rest on a reader thread, which then runs ``verify(buffer)``; with ``keep``, the
        next ``keep`` bytes after the header are the caller's to read (``read_kept``), the reader's
        the ones after them, both at once."""
        self._kept_bytes = max(0, min(keep, len(self._view) - self.head_end))
        if not self._kept_bytes:
            self._kept_got = 0
            self._kept.set()
        self._job = self._executor.submit(self._work, self.head_end + self._kept_bytes, verify)
        time.sleep(0)  # let the reader take the GIL and start its read now (~0.15 ms sooner on SD1.5)

    def read_kept(self) -> None:
        """Read the caller's share (``hand_over(keep=...)``) here, beside the reader thread's (once)."""
        if self._kept.is_set():
            return
        try:
            start = self.head_end
            self._kept_got = _pread_into(self._fh, self._view, start, start + self._kept_bytes)
        finally:
            self._kept.set()

    def discard(self) -> None:
        """Close a file that will not be read (before ``hand_over``)."""
        self._fh.close()
        self._read.set()

    def wait_read(self) -> None:
        """Return once every byte is in the buffer (or the read has failed: ``finish`` raises why),
        reading the caller's share first if it has not yet."""
        self.read_kept()
        self._read.wait()

    def finish(self) -> None:
        """Wait for the reader thread; raise its error (the read, then the hash)."""
        self._kept.set()  # a caller that gave up before reading its share: the reader stops there
        if self._job is None:  # never handed over: nothing else will close the file
            self.discard()
            return
        self._job.result()

    def _work(self, start: int, verify: Callable[[torch.Tensor], None] | None) -> None:
        view, size = self._view, len(self._view)
        try:
            got = _pread_into(self._fh, view, start, size)
            self._kept.wait()
        finally:
            self._fh.close()
            self._read.set()
        if self._kept_got is None:
            return  # the caller gave up (its error is the finding): nothing to verify
        done = self.head_end + self._kept_got + got
        if done < size or self._kept_got < self._kept_bytes:
            raise AdapterCorrupt(
                f"{self.path.name} changed while it was read: {done} of the {size} bytes it had when "
                "opened; nothing is served from it",
                reason="short_read",
                detail={"read": done, "size": size},
            )
        if verify is not None:
            verify(self.buffer)


def _pread_into(fh: FileIO, view: memoryview, start: int, end: int) -> int:
    """Bytes ``[start, end)`` of the file into the same bytes of ``view`` (``preadv``: no shared file
    position, so two threads read their parts at once); how many arrived (fewer at EOF)."""
    done = start
    while done < end:
        got = os.preadv(fh.fileno(), [view[done:end]], done)
        if not got:
            break
        done += got
    return done - start
