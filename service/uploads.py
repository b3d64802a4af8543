"""Streaming ``multipart/form-data`` parsing for adapter uploads, with size limits enforced as bytes arrive.

The route sets no Litestar body limit of its own: this module enforces ``max_adapter_bytes`` on the file
part (and ``max_body_bytes`` on the text fields) while the bytes arrive, with an early check of
``Content-Length``, so an oversized upload is refused with 413 before it is read. The file part's first
bytes are judged before its size (``adapters.sniff``): an HTML page or an image is a 422
``adapter_not_safetensors``, not a 413. The file part is
spooled to a temporary file under ``$LORASWAP_HOME/tmp/uploads`` (never held whole in memory), named
after the server's pid (``adapters/tempfiles.py``) so that ``sweep_spool`` at the next start removes
what a killed server left and nothing a running one still writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio.to_thread
from litestar import Request
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

from adapters import tempfiles
from adapters.errors import AdapterTooLarge, AdapterUnsafeFormat
from adapters.format import PICKLE_SUFFIXES
from adapters.pictures import PictureUpload
from adapters.sniff import SNIFF_BYTES, check_start
from basemodel.errors import ImageTooLarge, TooLarge, ValidationFailed

PICTURE_PARTS = {"picture": "preview", "loss_curve": "loss_curve", "samples": "samples"}
"""Form parts that carry a picture (repeatable), and the role each gives it."""

T = TypeVar("T")

FORM_FIELDS = frozenset({"file", "id", "metadata", "scale_default", *PICTURE_PARTS})
MAX_FORM_PARTS = 8  # besides the pictures
FORM_OVERHEAD = 64 << 10  # part headers and boundaries on top of the file and the text fields
SPOOL_FLUSH = 1 << 20  # write the upload to its temporary file in 1 MiB blocks (on a thread)
SPOOL_PREFIX = "upload-"


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking file, registry or store work on a worker thread."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))


@dataclass
class Upload:
    """A parsed multipart registration: text fields, and the file part spooled to ``path``."""

    fields: dict[str, str] = field(default_factory=dict)
    pictures: list[PictureUpload] = field(default_factory=list)
    path: Path | None = None
    filename: str | None = None
    size: int = 0
    head: bytearray = field(default_factory=bytearray)  # the file's first SNIFF_BYTES, until sniffed
    sniffed: bool = False

    def sniff(self, block: bytes, *, final: bool = False) -> None:
        """Judge the file by its first bytes (not safetensors → 422) before its size is checked."""
        if self.sniffed:
            return
        self.head += block[: SNIFF_BYTES - len(self.head)]
        if final or len(self.head) >= SNIFF_BYTES:
            self.sniffed = True
            check_start(bytes(self.head), self.size if final else None)

    def cleanup(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _picture_too_large(name: str, limit: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"a {name!r} picture is over the {limit}-byte limit",
        detail={"field": name, "limit": limit, "reason": "bytes"},
    )


def _too_large_body(limit: int) -> TooLarge:
    return TooLarge(f"request body exceeds the {limit}-byte limit", detail={"limit": limit})


def _file_too_large(limit: int) -> AdapterTooLarge:
    return AdapterTooLarge(
        f"adapter exceeds the {limit}-byte limit", reason="file_too_large", detail={"limit": limit}
    )


async def read_body(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes: announced or actually received."""
    if (request.content_length or 0) > limit:
        raise _too_large_body(limit)
    parts: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large_body(limit)
        parts.append(chunk)
    return b"".join(parts)


def spool_dir(home: Path) -> Path:
    """Where uploads are spooled: ``<home>/tmp/uploads``."""
    return home / "tmp" / "uploads"


def sweep_spool(folder: Path) -> list[Path]:
    """Remove spool files of servers that are gone (killed mid-upload); the paths removed."""
    return tempfiles.sweep(folder, SPOOL_PREFIX)


async def read_upload(
    request: Request[Any, Any, Any],
    boundary: str | None,
    *,
    max_file_bytes: int,
    max_field_bytes: int,
    spool: Path,
    max_pictures: int = 0,
    max_picture_bytes: int = 0,
) -> Upload:
    """Stream-parse ``multipart/form-data``: the ``file`` part to a file in ``spool``, picture parts
    (``picture``, ``loss_curve``, ``samples``: at most ``max_pictures`` of ``max_picture_bytes`` each) to
    memory, the rest as text."""
    if not boundary:
        raise ValidationFailed("multipart boundary missing in Content-Type", detail={"field": "body"})
    pictures_limit = max_pictures * (max_picture_bytes + FORM_OVERHEAD)
    total_limit = max_file_bytes + max_field_bytes + FORM_OVERHEAD + pictures_limit
    if (request.content_length or 0) > total_limit:
        raise _file_too_large(max_file_bytes)
    upload = Upload()
    handle: IO[bytes] | None = None
    pending = bytearray()
    text = bytearray()
    text_total = 0
    segment: MultipartSegment | None = None
    received = 0
    try:
        parts = MAX_FORM_PARTS + max_pictures
        with PushMultipartParser(boundary.encode(), max_segment_count=parts) as parser:
            async for chunk in request.stream():
                received += len(chunk)
                if received > total_limit:
                    raise _file_too_large(max_file_bytes)
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment = event
                        if segment.name not in FORM_FIELDS:
                            raise ValidationFailed(
                                f"unexpected form field {segment.name!r}",
                                detail={"field": segment.name, "allowed": sorted(FORM_FIELDS)},
                            )
                        if segment.name in upload.fields or (segment.name == "file" and upload.path):
                            raise ValidationFailed(
                                f"form field {segment.name!r} is given twice", detail={"field": segment.name}
                            )
                        if segment.name in PICTURE_PARTS and len(upload.pictures) >= max_pictures:
                            raise ValidationFailed(
                                f"more than {max_pictures} pictures given",
                                detail={"field": segment.name, "limit": max_pictures, "reason": "count"},
                            )
                        if segment.name == "file":
                            handle = await blocking(_open_spool, upload, segment.filename, spool)
                    elif event is not None:  # a block of the current part's body
                        assert segment is not None
                        if segment.name in PICTURE_PARTS:
                            text += event
                            if len(text) > max_picture_bytes:
                                raise _picture_too_large(segment.name, max_picture_bytes)
                        elif segment.name == "file":
                            upload.size += len(event)
                            upload.sniff(event)
                            if upload.size > max_file_bytes:
                                raise _file_too_large(max_file_bytes)
                            pending += event
                            if len(pending) >= SPOOL_FLUSH and handle is not None:
                                await blocking(handle.write, bytes(pending))
                                pending.clear()
                        else:
                            text_total += len(event)
                            if text_total > max_field_bytes:
                                raise _too_large_body(max_field_bytes)
                            text += event
                    else:  # end of the current part
                        assert segment is not None
                        if segment.name == "file" and handle is not None:
                            upload.sniff(b"", final=True)
                            await blocking(_finish_spool, handle, bytes(pending))
                            pending.clear()
                            handle = None
                        elif segment.name in PICTURE_PARTS:
                            role = PICTURE_PARTS[segment.name]
                            upload.pictures.append(PictureUpload(bytes(text), segment.filename or "", role))
                            text.clear()
                        elif segment.name != "file":
                            upload.fields[segment.name] = _decode_field(segment.name, bytes(text))
                            text.clear()
                        segment = None
                if parser.closed:
                    break
            if not parser.closed:
                parser.close()  # raises ParserError for a stream that ended early
    except (ParserError, ParserLimitReached) as exc:
        if handle is not None:
            handle.close()
        upload.cleanup()
        raise ValidationFailed(f"invalid multipart/form-data: {exc}", detail={"field": "body"}) from None
    except BaseException:
        if handle is not None:
            handle.close()
        upload.cleanup()
        raise
    return upload


def _open_spool(upload: Upload, filename: str | None, folder: Path) -> IO[bytes]:
    if filename and Path(filename).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterUnsafeFormat(
            f"refusing pickle file {Path(filename).name}: only .safetensors adapters are accepted",
            reason="pickle",
        )
    folder.mkdir(parents=True, exist_ok=True)
    fd, upload.path = tempfiles.make_temp(folder, SPOOL_PREFIX, ".safetensors")
    upload.filename = filename
    return os.fdopen(fd, "wb")


def _finish_spool(handle: IO[bytes], tail: bytes) -> None:
    with handle:
        handle.write(tail)


def _decode_field(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(f"form field {name!r} is not UTF-8 text", detail={"field": name}) from None


def upload_arguments(upload: Upload) -> tuple[str, str | None, float | None]:
    """(id, metadata JSON, scale_default) from the form's text fields."""
    if upload.path is None:
        raise ValidationFailed("the form has no 'file' part", detail={"field": "file"})
    adapter_id = upload.fields.get("id")
    if not adapter_id:
        raise ValidationFailed("the form has no 'id' field", detail={"field": "id"})
    metadata = upload.fields.get("metadata") or None
    raw_scale = (upload.fields.get("scale_default") or "").strip()
    try:
        scale = float(raw_scale) if raw_scale else None
    except ValueError:
        raise ValidationFailed(
            f"scale_default {raw_scale!r} is not a number", detail={"field": "scale_default"}
        ) from None
    return adapter_id, metadata, scale
