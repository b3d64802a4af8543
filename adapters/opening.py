"""A stored version's bytes opened in one pass: the hash, the header, the shapes, then every value.

``open_buffer`` opens bytes already in memory (a store's blob). ``open_file`` opens a file still being
read (``adapters.readahead``): the header is parsed, the tensors are viewed and a plain LoRA's names and
shapes are checked while the rest arrives on a reader thread, which then hashes it; the values are summed
here once the bytes are in. Both run the same checks, and a hash mismatch is reported before any other
finding. Two things are not repeated for bytes that passed before: a header whose exact bytes passed
(``HeaderMemo``), and, for a file this process verified and checked (``values=False``, the cache's
stamp), the hash and the value sum. The tensors are views of the bytes read: nothing is copied.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from adapters.errors import AdapterCorrupt
from adapters.format import Limits
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, parse_header_metadata
from adapters.prepare import check_open_compatible
from adapters.readahead import OpenFile
from adapters.records import AdapterVersion
from adapters.validate import check_canonical, check_lora_shapes
from adapters.views import (
    FileTensors,
    Layout,
    blake3_hex,
    check_finite_region,
    file_views,
    head_of,
    parse_layout,
    sha256_hex,
    view_layout,
)

# the file bytes the reader thread reads in the time the loading thread spends on one tensor (views and
# a layer, ~3.5 µs cold, at ~5.6 GB/s), halved: the two threads' shares then end together
SHARE_BYTES_PER_TENSOR = 10 << 10

__all__ = [
    "Checked",
    "HeaderMemo",
    "LoadedAdapter",
    "OpenChecks",
    "open_buffer",
    "open_file",
    "verify_digest",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedAdapter:
    """A version opened from the store: verified canonical tensors and their metadata.

    ``files`` holds the tensors as views of the file read, so ``materialise`` can convert them to the
    model's dtype a run of tensors at a time.
    """

    version: AdapterVersion
    tensors: dict[str, torch.Tensor]
    metadata: AdapterMetadata
    files: FileTensors | None = None

    def materialise(
        self, device: torch.device, dtype: torch.dtype, *, non_blocking: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors on ``device`` in ``dtype`` (converted per run of the file's data region)."""
        if self.files is not None:
            return self.files.materialise(device, dtype, non_blocking=non_blocking)
        return {
            k: t.to(device=device, dtype=dtype, non_blocking=non_blocking) for k, t in self.tensors.items()
        }


@dataclass(frozen=True)
class OpenChecks:
    """What an open checks the bytes against: the base model (when known) and the header's size bound."""

    base: BaseIdentity | None
    strict_base: bool
    max_header_bytes: int


def verify_digest(version: AdapterVersion, buffer: torch.Tensor) -> None:
    """The bytes of ``version`` are the bytes registered: BLAKE3 when its record has one, else sha256
    (the content id; records written before BLAKE3 was recorded). A mismatch names the version; a BLAKE3
    mismatch on bytes whose sha256 is the record's (a damaged record, not a damaged file) passes."""
    algorithm, expected = ("blake3", version.blake3) if version.blake3 else ("sha256", version.sha256)
    actual = blake3_hex(buffer) if algorithm == "blake3" else sha256_hex(buffer)
    if actual != expected and algorithm == "blake3" and sha256_hex(buffer) == version.sha256:
        # the file is the content its id names: the record's BLAKE3 is what is wrong (fsck reports it)
        log.warning("the record of %s has a BLAKE3 that is not its file's; sha256 verified", version.ref)
        return
    if actual != expected:
        raise AdapterCorrupt(
            f"{version.ref} is corrupt: its file (sha256 {version.sha256[:12]}…) fails its recorded "
            f"{algorithm} (expected {expected[:12]}…, read {actual[:12]}…); nothing is served from it",
            reason="sha256_mismatch",
            detail={
                "adapter_id": version.adapter_id,
                "version": version.version,
                "algorithm": algorithm,
                "expected": expected,
                "actual": actual,
            },
            hint="Re-register the adapter (or restore its blob from a backup); 'loraswap adapters verify' "
            "lists every such version.",
        )


def open_buffer(
    version: AdapterVersion, buffer: torch.Tensor, checks: OpenChecks, *, verify: bool = True
) -> LoadedAdapter:
    """``buffer`` (a ``uint8`` tensor) as the file of ``version``: hash, header, shapes, values."""
    if verify:
        verify_digest(version, buffer)
    if checks.base is not None:
        check_open_compatible(version, checks.base, checks.strict_base)
    files, header = file_views(buffer, _limits(buffer, checks))
    check_canonical(files.tensors, checks.base.architecture if checks.base else None, finite=False)
    check_finite_region(files)
    metadata = parse_header_metadata(header) or AdapterMetadata()
    return LoadedAdapter(version=version, tensors=files.tensors, metadata=metadata, files=files)


def open_file(
    version: AdapterVersion,
    file: OpenFile,
    checks: OpenChecks,
    *,
    verify: bool = True,
    values: bool = True,
    memo: HeaderMemo | None = None,
    meanwhile: Callable[[dict[str, torch.Tensor]], object] | None = None,
) -> LoadedAdapter:
    """``file`` (opened, not yet read) as the file of ``version``, its read overlapped with the header
    work: the same checks as ``open_buffer``, and the hash's verdict first. A header in ``memo`` (the
    same bytes passed before) is not parsed and checked again. ``values=False`` (with ``verify=False``)
    is for bytes this process verified and checked before (the same file, by its stamp): the hash's
    check and the value check then both rest on that stamp. ``meanwhile(tensors)`` runs on this thread
    once a plain LoRA's structure has passed, while the bytes still arrive: it gets the views and must
    read no value (the cache builds its layers there: ``DeviceAdapter.build(views_only=True)``)."""
    if checks.base is not None:
        try:
            check_open_compatible(version, checks.base, checks.strict_base)
        except BaseException:
            file.discard()
            raise
    file.read_head(max_header_bytes=checks.max_header_bytes)
    limits = _limits(file.buffer, checks)
    architecture = checks.base.architecture if checks.base else None
    size = file.buffer.numel()
    try:
        head = head_of(file.buffer, limits)
        known = memo.get(version.sha256, head, size, checks) if memo is not None else None
        # a header known to pass leaves this thread free at once: it reads a share of the values itself
        # while the reader thread reads the rest (two copies out of the page cache at a time)
        keep = _share_bytes(known.layout) if known is not None else 0
        file.hand_over(partial(verify_digest, version) if verify else None, keep=keep)
        layout = known.layout if known is not None else parse_layout(head, size, limits)
        files = view_layout(file.buffer, layout, ready=file.wait_read)
        if known is not None:
            metadata, checked = known.metadata.model_copy(), known.lora_checked
        else:
            metadata = parse_header_metadata(layout.metadata) or AdapterMetadata()
            checked = check_lora_shapes(files.tensors, architecture)  # reads no value: during the read
        if checked and meanwhile is not None:
            meanwhile(files.tensors)
        file.wait_read()
        if not checked:  # the other kinds' structure checks read a few values (alphas, DoRA groups)
            check_canonical(files.tensors, architecture, finite=False)
        if values or verify:  # while the reader thread hashes
            check_finite_region(files)
    except BaseException:
        file.finish()  # bytes that are not the registered ones: that is the finding, not their header
        raise
    file.finish()
    if memo is not None and known is None:
        memo.put(version.sha256, Checked(layout, metadata.model_copy(), checked), checks)
    return LoadedAdapter(version=version, tensors=files.tensors, metadata=metadata, files=files)


@dataclass(frozen=True)
class Checked:
    """A header that passed every check of an open: its layout, its metadata, and whether its structure
    was checked from the names and shapes alone (a plain LoRA's; other kinds are checked again)."""

    layout: Layout
    metadata: AdapterMetadata
    lora_checked: bool


class HeaderMemo:
    """Headers that passed every check of an open, by content id. A file whose header bytes and size
    equal one that passed (compared whole, not by a hash) against the same base and limits has the same
    layout and passes the same header and structure checks, which are pure functions of those: its open
    skips parsing them again (SD1.5: about 1.5 of a 5 ms cold load). What is kept is bounded by an
    estimate of its memory (``max_bytes``; an SDXL header of 1,120 tensors holds about 1 MB parsed)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[Checked, OpenChecks, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str, head: bytes, size: int, checks: OpenChecks) -> Checked | None:
        with self._lock:
            found = self._entries.get(sha256)
            if found is None:
                return None
            self._entries.move_to_end(sha256)
        known, against, _ = found
        same = against.base is checks.base and against.max_header_bytes == checks.max_header_bytes
        return known if same and known.layout.size == size and known.layout.head == head else None

    def forget(self, sha256: str) -> None:
        with self._lock:
            found = self._entries.pop(sha256, None)
            self.nbytes -= found[2] if found is not None else 0

    def put(self, sha256: str, known: Checked, checks: OpenChecks) -> None:
        # measured with tracemalloc: the parsed entries hold ~730 bytes per tensor beside the header text
        cost = len(known.layout.head) + 750 * len(known.layout.entries)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(sha256, None)
            self.nbytes += cost - (old[2] if old is not None else 0)
            self._entries[sha256] = (known, checks, cost)
            while self.nbytes > self.max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self.nbytes -= dropped


def _share_bytes(layout: Layout) -> int:
    """The loading thread's share of a known header's values: half, less what its Python work per tensor
    (views, layers: ~3.5 µs a tensor on cpu-2c, cold) would otherwise leave the reader thread waiting
    for. 0 for mixed dtypes (their views are copies) and unaligned data."""
    if not layout.spans or layout.start % 8:
        return 0
    data = layout.size - layout.start
    return max(0, data // 2 - len(layout.spans) * SHARE_BYTES_PER_TENSOR) // 8 * 8


def _limits(buffer: torch.Tensor, checks: OpenChecks) -> Limits:
    return Limits(max_bytes=buffer.numel(), max_header_bytes=checks.max_header_bytes)
