"""A stored version's file in one pass: read once, tensors as views of those bytes, then converted.

``read_file`` reads a file straight into one ``uint8`` tensor (page-locked when asked, for CUDA uploads)
and stamps exactly the file it read. ``file_views`` parses the header from that buffer (every check
``read_header`` makes) and returns the tensors as zero-copy views of it, so the shapes can be checked
before anything is built. ``FileTensors.materialise`` turns them into tensors of the model's device and
dtype with a few conversions of runs of the data region (canonical files hold one dtype), and
``check_finite_region`` checks every value with one fp32-accumulating sum over that region.

``digest_of`` verifies a buffer against its record: BLAKE3 when the record has one (registration writes
both; about 9x faster than sha256 here), else sha256 (records written before BLAKE3 was recorded).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import torch

from adapters.buffers import BufferPool
from adapters.errors import AdapterInvalid
from adapters.format import Limits, read_header
from adapters.validate import check_finite

__all__ = [
    "FileTensors",
    "Layout",
    "Stamp",
    "as_buffer",
    "blake3_hasher",
    "blake3_hex",
    "check_finite_region",
    "file_views",
    "head_of",
    "new_buffer",
    "parse_layout",
    "read_file",
    "view_layout",
]

Stamp = tuple[int, int, int]  # (inode, size, mtime_ns) of a file as read
# Conversions run per run of tensors of about 1 MiB in fp32: one conversion of a whole SDXL region (93 MB)
# is a fresh mmap that page-faults on every use (76-130 ms measured), 1 MiB pieces reuse heap memory
# (40-56 ms); a 12.8 MB SD1.5 region converts as fast either way.
CHUNK_ELEMENTS = 1 << 18
BLAKE3_THREADS_BYTES = 8 << 20
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def blake3_hex(data: bytes | bytearray | memoryview | torch.Tensor) -> str:
    """BLAKE3 of ``data`` (a ``uint8`` tensor is hashed in place, without a copy)."""
    memory = _memory(data)
    return blake3_hasher(memoryview(memory).nbytes).update(memory).hexdigest()


def blake3_hasher(size: int) -> blake3.blake3:
    """A BLAKE3 hasher for ``size`` bytes: from ``BLAKE3_THREADS_BYTES`` on, on every core (the same
    digest; 45 MB hashed in 3.7 ms instead of 9.0 ms on cpu-2c, 13 MB in 1.1 instead of 1.9 ms; 6 MB
    was slower that way, 0.96 against 0.84 ms)."""
    threads = blake3.blake3.AUTO if size >= BLAKE3_THREADS_BYTES else 1
    return blake3.blake3(max_threads=threads)


def sha256_hex(data: bytes | bytearray | memoryview | torch.Tensor) -> str:
    return hashlib.sha256(_memory(data)).hexdigest()


def _memory(data: bytes | bytearray | memoryview | torch.Tensor) -> bytes | bytearray | memoryview:
    if isinstance(data, torch.Tensor):
        return _view(data)
    return data


def _view(buffer: torch.Tensor) -> memoryview:
    """The bytes of a CPU ``uint8`` tensor, writable, without a copy."""
    return memoryview(buffer.numpy())  # type: ignore[arg-type]  # ndarray implements the buffer protocol


def new_buffer(size: int, *, pin: bool = False, pool: BufferPool | None = None) -> torch.Tensor:
    """An uninitialised ``uint8`` buffer of ``size`` bytes for a file read: page-locked if ``pin``, else
    from ``pool`` when given."""
    if pool is not None and not pin:
        return pool.take(size)
    return torch.empty(size, dtype=torch.uint8, pin_memory=pin)


def read_file(
    path: Path, *, pin: bool = False, pool: BufferPool | None = None
) -> tuple[torch.Tensor, Stamp] | None:
    """The whole file in one ``uint8`` tensor (page-locked if ``pin``, else from ``pool`` when given)
    and the stamp of the file read (fstat on the same handle); None when it does not exist. A file that
    shrinks while it is read gives a buffer of the bytes read, which then fails its hash."""
    try:
        with open(path, "rb", buffering=0) as fh:
            info = os.fstat(fh.fileno())
            buffer = new_buffer(info.st_size, pin=pin, pool=pool)
            view = _view(buffer)
            done = 0
            while done < info.st_size:
                got = fh.readinto(view[done:])
                if not got:
                    buffer = buffer[:done]
                    break
                done += got
            return buffer, (info.st_ino, info.st_size, info.st_mtime_ns)
    except FileNotFoundError:
        return None


def as_buffer(data: bytes | bytearray | memoryview | torch.Tensor, *, pin: bool = False) -> torch.Tensor:
    """``data`` as a writable ``uint8`` tensor that owns its memory (one copy unless it already is one)."""
    if isinstance(data, torch.Tensor):
        return data.pin_memory() if pin and not data.is_pinned() else data
    buffer = torch.empty(len(data), dtype=torch.uint8, pin_memory=pin)
    buffer.numpy()[:] = memoryview(data).cast("B")
    return buffer


@dataclass(frozen=True)
class FileTensors:
    """The tensors of one file as views of its buffer. ``region`` is the whole data region in the file's
    dtype when every tensor has that one dtype (canonical files), else None; ``spans`` places each tensor
    in it (element offset, element count, shape)."""

    tensors: dict[str, torch.Tensor]
    region: torch.Tensor | None
    spans: dict[str, tuple[int, int, tuple[int, ...]]]

    def materialise(
        self, device: torch.device, dtype: torch.dtype, *, non_blocking: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every tensor on ``device`` in ``dtype``: one conversion/copy per run of ``CHUNK_ELEMENTS`` of
        the region, then views of it (nothing is copied when the region already has that device and
        dtype)."""
        if self.region is None:
            tensors = self.tensors.items()
            return {k: t.to(device=device, dtype=dtype, non_blocking=non_blocking) for k, t in tensors}
        region, out = self.region, {}
        for start, count, group in _chunks(self.spans):
            piece = region[start : start + count].to(device=device, dtype=dtype, non_blocking=non_blocking)
            out.update(_split(piece, group, origin=start))
        return out


@dataclass(frozen=True)
class Layout:
    """A file's header, parsed and checked (``read_header``): where its tensors lie. A pure function of
    the header's bytes (``head``) and the file's size, so a file with the same two has the same layout."""

    head: bytes
    size: int
    entries: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    spans: dict[str, tuple[int, int, tuple[int, ...]]]  # one dtype: element offset, count, shape

    @property
    def start(self) -> int:
        return len(self.head)


def head_of(buffer: torch.Tensor, limits: Limits) -> bytes:
    """The bytes of ``buffer``'s header as ``parse_layout`` reads them (at most one past the limit)."""
    data = _view(buffer)
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return bytes(data[: min(len(data), 8 + min(header_len, limits.max_header_bytes + 1))])


def parse_layout(head: bytes, size: int, limits: Limits) -> Layout:
    """Parse and check the header ``head`` of a ``size``-byte file (``read_header``'s checks)."""
    entries, metadata = read_header(head, limits, size=size)
    if not entries:
        raise AdapterInvalid("the file contains no tensors", reason="empty")
    spans = {}
    dtypes = {entry["dtype"] for entry in entries.values()}
    if len(dtypes) == 1:
        item = torch.empty((), dtype=TORCH_DTYPES[dtypes.pop()]).element_size()
        spans = {
            name: (entry["data_offsets"][0] // item, math.prod(entry["shape"]), tuple(entry["shape"]))
            for name, entry in entries.items()
        }
        spans = dict(sorted(spans.items(), key=lambda kv: kv[1][0]))  # file order: they tile the region
    return Layout(head, size, entries, metadata, spans)


def view_layout(
    buffer: torch.Tensor, layout: Layout, *, ready: Callable[[], None] = lambda: None
) -> FileTensors:
    """The tensors of ``layout`` as views of ``buffer`` (a file whose header is ``layout.head``).

    Data whose start is not aligned for its dtype (a writer that does not pad its header) is copied once
    into an aligned buffer first. Only the header bytes need to be in ``buffer`` when this is called:
    ``ready()`` returns once the rest is (a read still in progress, ``adapters.readahead``), and is
    called before any copy reads it.
    """
    region_bytes = buffer[layout.start :]
    if layout.start % 8:
        ready()
        region_bytes = region_bytes.clone()
    if layout.spans:
        dtype = TORCH_DTYPES[next(iter(layout.entries.values()))["dtype"]]
        region = region_bytes.view(dtype)
        return FileTensors(_split(region, layout.spans), region, layout.spans)
    ready()
    tensors = {}
    for name, entry in layout.entries.items():
        begin, end = entry["data_offsets"]
        raw = region_bytes[begin:end].clone()  # mixed dtypes (refused later as such): aligned copies
        tensors[name] = raw.view(TORCH_DTYPES[entry["dtype"]]).view(tuple(entry["shape"]))
    return FileTensors(tensors, None, {})


def file_views(
    buffer: torch.Tensor, limits: Limits, *, ready: Callable[[], None] = lambda: None
) -> tuple[FileTensors, dict[str, str]]:
    """Parse and check ``buffer``'s header and view its tensors, copying none (``parse_layout`` then
    ``view_layout``): the views and the header's ``__metadata__``."""
    layout = parse_layout(head_of(buffer, limits), buffer.numel(), limits)
    return view_layout(buffer, layout, ready=ready), layout.metadata


def _chunks(
    spans: dict[str, tuple[int, int, tuple[int, ...]]],
) -> Iterator[tuple[int, int, dict[str, tuple[int, int, tuple[int, ...]]]]]:
    """Consecutive tensors grouped into runs of at least ``CHUNK_ELEMENTS``: (start, count, spans)."""
    group: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    start = count = 0
    for name, span in spans.items():
        if not group:
            start = span[0]
        group[name] = span
        count += span[1]
        if count >= CHUNK_ELEMENTS:
            yield start, count, group
            group, count = {}, 0
    if group:
        yield start, count, group


def _split(
    region: torch.Tensor, spans: dict[str, tuple[int, int, tuple[int, ...]]], *, origin: int = 0
) -> dict[str, torch.Tensor]:
    """Views of ``region`` per span (element offset, count, shape), ``region`` starting at element
    ``origin`` of the spans' numbering: one ``as_strided`` each (half the cost of a split and a view per
    tensor: 256 tensors are ~0.3 ms instead of ~0.7 ms). ``file_views`` checked the spans tile the data
    region; ``as_strided`` refuses a view past the end of the storage."""
    base = region.storage_offset() - origin
    return {
        name: region.as_strided(shape, _strides(shape), base + offset)
        for name, (offset, _count, shape) in spans.items()
    }


@functools.lru_cache(maxsize=4096)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major (contiguous) strides of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def check_finite_region(files: FileTensors) -> None:
    """Every value finite: one sum over the region in its own dtype (NaN and ±inf always make it
    non-finite; torch accumulates fp16/bf16 in fp32, several times faster than ``sum(dtype=float32)``).
    A non-finite sum (a real NaN/inf, or finite values overflowing the result's dtype) falls back to the
    exact per-tensor check, which names the tensors."""
    if files.region is not None and math.isfinite(float(files.region.sum())):
        return
    check_finite(files.tensors)
