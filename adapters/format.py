"""Reading and writing adapter files: safetensors only, header checked by hand, never unpickled.

``read_adapter`` checks the container before any library parses it: the first bytes must be able to
open a safetensors file (``adapters.sniff``: an HTML page, an image, an archive or an empty file is named
as such, before any size check; pickle / zip (``torch.save``) magic is refused unopened), the 8-byte
little-endian header length is bounded before the header is read, the header JSON must describe
contiguous, in-bounds tensors of an accepted dtype, and only then does ``safetensors`` (Rust, no code
execution) materialise the tensors. Stored versions are opened in one pass by ``adapters.views`` instead
(the same header checks, tensors as views of the bytes read).

``write_adapter`` writes canonical-layout tensors (see ``adapters.normalise``) with the ``loraswap``
metadata entry and the kohya/modelspec keys, atomically when given a path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch

from adapters.errors import AdapterInvalid, AdapterTooLarge, AdapterUnsafeFormat
from adapters.kohya_export import to_kohya
from adapters.metadata import (
    METADATA_KEY,
    AdapterMetadata,
    interop_keys,
    parse_header_metadata,
    untrusted_json,
)
from adapters.normalise import NormaliseInfo, normalise
from adapters.sniff import SNIFF_BYTES, check_start
from adapters.validate import check_canonical, dominant
from basemodel.fingerprint import Architecture

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "NormaliseInfo",
    "check_readable",
    "data_sha256",
    "normalise",
    "read_adapter",
    "read_header",
    "read_limited",
    "serialise",
    "write_adapter",
    "write_bytes_atomic",
    "write_kohya",
]

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_TENSORS = 100_000


@dataclass(frozen=True)
class Limits:
    """Size limits applied before anything is parsed."""

    max_bytes: int = 512 << 20
    max_header_bytes: int = 1 << 20


DEFAULT_LIMITS = Limits()


def read_limited(stream: IO[bytes], max_bytes: int, chunk: int = 1 << 20) -> bytes:
    """Read a whole upload, refusing (AdapterTooLarge) as soon as it exceeds ``max_bytes``."""
    parts: list[bytes] = []
    total = 0
    while block := stream.read(chunk):
        total += len(block)
        if total > max_bytes:
            raise AdapterTooLarge(
                f"adapter exceeds the {max_bytes}-byte limit",
                reason="file_too_large",
                detail={"limit": max_bytes},
            )
        parts.append(block)
    return b"".join(parts)


def load_source(source: bytes | Path, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an adapter given as bytes or a path, with suffix and size checks first."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        check_start(data[:SNIFF_BYTES], len(data))  # what the bytes are, before their size
    else:
        path = Path(source)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterUnsafeFormat(
                f"refusing pickle file {path.name}: only .safetensors adapters are accepted",
                reason="pickle",
                detail={"path": str(path)},
            )
        if not path.is_file():
            raise AdapterInvalid(f"adapter file {path} does not exist", reason="missing_file")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            check_start(fh.read(SNIFF_BYTES), size)  # what the bytes are, before their size
            if size > limits.max_bytes:
                raise _too_large(size, limits)
            fh.seek(0)
            data = read_limited(fh, limits.max_bytes)
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits)
    return data


def _too_large(size: int, limits: Limits) -> AdapterTooLarge:
    return AdapterTooLarge(
        f"adapter is {size} bytes, over the {limits.max_bytes}-byte limit",
        reason="file_too_large",
        detail={"size": size, "limit": limits.max_bytes},
    )


def read_header_only(
    head: bytes, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse a header from the first bytes of a file (tensor offsets are not checked against its size)."""
    return _parse_header(head, limits)


def read_header(
    data: bytes, limits: Limits = DEFAULT_LIMITS, *, size: int | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse and check a safetensors header: (tensor entries, ``__metadata__``). No tensor is read.

    ``data`` is the whole file, or its first bytes (at least the header) with ``size`` the file's length.
    """
    size = len(data) if size is None else size
    header, metadata = _parse_header(data, limits, size)
    _check_entries(header, size - 8 - int.from_bytes(data[:8], "little"))
    return header, metadata


def _parse_header(
    data: bytes, limits: Limits, size: int | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``size``: the whole file's when ``data`` is all of it (a header beyond it is then not 'too large')."""
    check_start(data[:SNIFF_BYTES], size)
    header_len = int.from_bytes(data[:8], "little")
    if size is not None and 8 + header_len > size:
        raise AdapterInvalid(
            f"not a safetensors file, or truncated: the first 8 bytes declare a {header_len}-byte header, "
            f"the file has {size - 8} bytes after them",
            reason="truncated",
            detail={"header_bytes": header_len, "size": size},
        )
    if header_len > limits.max_header_bytes:
        raise AdapterTooLarge(
            f"safetensors header declares {header_len} bytes, over the {limits.max_header_bytes}-byte limit",
            reason="header_too_large",
            detail={"header_bytes": header_len, "limit": limits.max_header_bytes},
        )
    if 8 + header_len > len(data):
        raise AdapterInvalid(
            f"header declares {header_len} bytes, the file has {len(data) - 8} after the length (truncated)",
            reason="truncated",
        )
    raw = data[8 : 8 + header_len]
    header = untrusted_json(raw, "the safetensors header", reason="malformed_header")
    if not isinstance(header, dict):
        raise AdapterInvalid("safetensors header is not a JSON object", reason="malformed_header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterInvalid(
            "safetensors __metadata__ must map strings to strings", reason="malformed_header"
        )
    return header, metadata


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _check_entries(entries: dict[str, Any], data_len: int) -> None:
    """Every entry well formed, its byte span its shape's size, the spans tiling the data region.

    One tight loop per entry (a cold load checks every header: SD1.5's 256 entries in ~0.1 ms)."""
    if len(entries) > MAX_TENSORS:
        raise AdapterInvalid(f"too many tensors ({len(entries)})", reason="malformed_header")
    spans: list[tuple[int, int]] = []
    for name, entry in entries.items():
        if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
            raise AdapterInvalid(f"malformed header entry for tensor {name!r}", reason="malformed_header")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        width = SAFETENSORS_DTYPES.get(dtype) if type(dtype) is str else None
        if width is None:
            raise AdapterInvalid(
                f"unsupported tensor dtype {dtype} (in {name}); fp32, fp16 and bf16 are accepted",
                reason="unsupported_dtype",
                detail={"keys": [name], "dtypes": [str(dtype)]},
            )
        count = _element_count(shape)
        if count is None or type(offsets) is not list or len(offsets) != 2:
            raise AdapterInvalid(f"malformed shape/offsets for tensor {name!r}", reason="malformed_header")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int:
            raise AdapterInvalid(f"malformed shape/offsets for tensor {name!r}", reason="malformed_header")
        if not 0 <= begin <= end <= data_len or end - begin != count * width:
            raise AdapterInvalid(
                f"tensor {name!r} has offsets {offsets} inconsistent with its shape or the file size",
                reason="truncated" if end > data_len else "malformed_header",
            )
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise AdapterInvalid("tensor data regions overlap or leave gaps", reason="malformed_header")
        position = end
    if position != data_len:
        raise AdapterInvalid(
            "tensor data does not cover the file exactly (truncated or trailing bytes)",
            reason="truncated" if position > data_len else "malformed_header",
        )


def _element_count(shape: Any) -> int | None:
    """The number of elements of a header's shape (a list of non-negative ints), else None."""
    if type(shape) is not list:
        return None
    count = 1
    for size in shape:
        if type(size) is not int or size < 0:
            return None
        count *= size
    return count


def read_adapter(
    data: bytes | Path, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Safely read an adapter file: (tensors, header metadata). Never unpickles anything."""
    raw = load_source(data, limits)
    entries, metadata = read_header(raw, limits)
    if not entries:
        raise AdapterInvalid("the file contains no tensors", reason="empty")
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError variants
        raise AdapterInvalid(f"unreadable safetensors data: {exc}", reason="malformed_header") from None
    return tensors, metadata


def check_readable(data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    """Run on bytes about to be stored the header checks every reader of a stored file applies.

    ``read_adapter`` (open, preload) and ``read_header_only`` + ``parse_header_metadata`` (show) read
    stored files with ``limits``: the file size, the header size and depth, the entries and the
    ``loraswap`` entry. Metadata that fits its own limits can still push the header over them (the title
    is written twice), so a registration refuses here (413/422) instead of storing what cannot be read.
    """
    try:
        _, header = read_header(load_source(data, limits), limits)
        parse_header_metadata(header)
    except (AdapterTooLarge, AdapterInvalid) as exc:
        raise type(exc)(
            f"the adapter as it would be stored, with its metadata, is refused: {exc.message}",
            detail=exc.detail,
            hint="Shorten the metadata (title, description), or raise LORASWAP_MAX_ADAPTER_HEADER_BYTES.",
        ) from None


def data_sha256(data: bytes) -> str:
    """kohya's ``sshs_model_hash``: sha256 of everything after the safetensors header."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def serialise(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    """safetensors bytes for ``tensors`` with ``header`` (+ ``sshs_model_hash``) as metadata."""
    contiguous = {k: v.detach().contiguous() for k, v in sorted(tensors.items())}
    draft = safetensors.torch.save(contiguous, metadata={"format": "pt", **header})
    final = {"format": "pt", **header, "sshs_model_hash": data_sha256(draft)}
    return safetensors.torch.save(contiguous, metadata=final)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers never see a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def complete_metadata(tensors: dict[str, torch.Tensor], metadata: AdapterMetadata) -> AdapterMetadata:
    """Validate canonical tensors and fill the tensor summary fields ``metadata`` leaves empty."""
    summary = check_canonical(tensors)
    rank, rank_pattern = dominant(summary.ranks)
    update: dict[str, Any] = {"dtype": summary.dtype}
    if summary.kind != "lora":
        update["kind"] = summary.kind
    if not metadata.target_modules:
        update["target_modules"] = summary.target_modules
    if metadata.rank is None:
        update["rank"] = int(rank)
        update["rank_pattern"] = {k: int(v) for k, v in rank_pattern.items()}
    if metadata.alpha is None:
        update["alpha"] = float(metadata.rank or rank)
    if metadata.created_at is None:
        update["created_at"] = datetime.now(UTC)
    return metadata.model_copy(update=update)


def write_adapter(
    path: Path | None,
    tensors: dict[str, torch.Tensor],
    metadata: AdapterMetadata,
    architecture: Architecture | None = None,
) -> bytes:
    """Validate canonical-layout tensors and write .safetensors.

    Returns the bytes; also writes them atomically to ``path`` when given. ``architecture`` (the
    base's) lets the modelspec / kohya keys name the family's variant (Flux dev or schnell …).
    """
    metadata = complete_metadata(tensors, metadata)
    config = architecture.unet_config if architecture is not None else None
    header = {METADATA_KEY: metadata.to_json(), **interop_keys(metadata, config)}
    data = serialise(tensors, header)
    if path is not None:
        write_bytes_atomic(Path(path), data)
    return data


def write_kohya(
    path: Path | None,
    tensors: dict[str, torch.Tensor],
    metadata: AdapterMetadata,
    architecture: Architecture | None = None,
) -> bytes:
    """Export canonical tensors in kohya/A1111 layout (``lora_unet_…``/``lora_te_…``, alpha = rank).

    ``architecture`` (the base's) selects the names sd-scripts writes for its family, e.g. SDXL's LDM/SGM
    UNet names and ``lora_te1_``/``lora_te2_`` (see ``adapters.kohya_export.to_kohya``).
    """
    metadata = complete_metadata(tensors, metadata)
    config = architecture.unet_config if architecture is not None else None
    header = {METADATA_KEY: metadata.to_json(), **interop_keys(metadata, config)}
    data = serialise(to_kohya(tensors, architecture), header)
    if path is not None:
        write_bytes_atomic(Path(path), data)
    return data
