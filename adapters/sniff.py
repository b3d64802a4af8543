"""What the first bytes of a file say it is, before any size check: safetensors or something else.

A safetensors file opens with an 8-byte little-endian header length and then the header's JSON object
(``{`` at byte 8). Bytes that cannot open a safetensors file — an HTML login page saved as
``.safetensors`` (the usual failed download), a renamed image, an archive, a pickle checkpoint, an
empty file — are named here from their magic numbers, so the error says what they look like instead of
reading their first 8 bytes as a header length (an HTML page's ``<!DOCTYP`` is 5.8·10¹⁸ bytes).

``check_start`` raises: ``AdapterUnsafeFormat`` (reason ``pickle``) for a ZIP (``torch.save``) or pickle
checkpoint, refused unopened; ``AdapterNotSafetensors`` (422, ``detail.looks_like``) for everything else
that cannot be safetensors. It needs only ``SNIFF_BYTES`` of the head, so uploads are judged on their
first block, before the size limit is checked.
"""

from __future__ import annotations

from adapters.errors import AdapterNotSafetensors, AdapterUnsafeFormat

__all__ = ["SNIFF_BYTES", "check_start", "looks_like"]

SNIFF_BYTES = 64
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap: a larger declared header is never a real file

# (magic at offset 0, kind, what it is), checked in order.
MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png", "a PNG image"),
    (b"\xff\xd8\xff", "jpeg", "a JPEG image"),
    (b"GIF87a", "gif", "a GIF image"),
    (b"GIF89a", "gif", "a GIF image"),
    (b"\x1f\x8b", "gzip", "a gzip-compressed file"),
    (b"BZh", "bzip2", "a bzip2-compressed file"),
    (b"\xfd7zXZ\x00", "xz", "an xz-compressed file"),
    (b"\x28\xb5\x2f\xfd", "zstd", "a zstd-compressed file"),
    (b"7z\xbc\xaf\x27\x1c", "7z", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "rar", "a RAR archive"),
    (b"%PDF-", "pdf", "a PDF document"),
    (b"GGUF", "gguf", "a GGUF model file"),
)
JSON_START = frozenset(bytes([c]) for c in b'{["-0123456789tfn \t\r\n')
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<meta", b"<title", b"<script")


def looks_like(head: bytes) -> tuple[str, str]:
    """(kind, description) of bytes that are not safetensors, from their first ``SNIFF_BYTES``."""
    if not head:
        return "empty", "an empty file (0 bytes)"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip", "a ZIP archive, e.g. a torch.save (.pt/.ckpt) checkpoint with a pickle inside"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", f"a pickle (protocol {head[1]}), e.g. a torch checkpoint"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", "a WebP image"
    for magic, kind, what in MAGIC:
        if head.startswith(magic):
            return kind, what
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(HTML_STARTS):
        return "html", "an HTML page (a failed or login-walled download saved under the file's name?)"
    if text.startswith(b"<?xml"):
        return "xml", "an XML document"
    if text[:1] in (b"{", b"["):
        return "json", "JSON text (an error body or a config file?)"
    if _is_text(head):
        return "text", "a text file"
    return "unknown", "unknown binary data"


def _is_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:  # a multi-byte character cut at the end of the head is still text
        try:
            decoded = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in decoded)


def check_start(head: bytes, size: int | None = None) -> None:
    """Refuse bytes whose start cannot open a safetensors file (``size``: the whole file's, if known).

    Passes a start that could be safetensors: a header length of at most safetensors' 100 MB cap, then
    a byte that can open JSON text (a header that is JSON but not an object is the parser's
    ``malformed_header``); whether the header fits the file and the limits is the parser's to check.
    A ZIP or pickle start is refused even then (a pickle is refused unless byte 8 is ``{``).
    """
    total = len(head) if size is None else size
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    plausible = len(head) >= 9 and header_len <= MAX_HEADER_BYTES and head[8:9] in JSON_START
    if plausible and not (pickle and head[8:9] != b"{") and head[:4] != b"PK\x03\x04":
        return
    kind, what = looks_like(head)
    detail = {"looks_like": kind, "size": total}
    if kind in ("zip", "pickle"):
        raise AdapterUnsafeFormat(
            f"this is {what}; it is refused without being opened (only .safetensors adapters are accepted)",
            reason="pickle",
            detail=detail,
        )
    if kind == "empty" or (kind == "unknown" and total < 9):
        raise AdapterNotSafetensors(
            f"not a safetensors file, or truncated: {what if kind == 'empty' else f'{total} bytes'}",
            reason="truncated",
            detail=detail,
        )
    raise AdapterNotSafetensors(
        f"not a safetensors file: the bytes look like {what}", reason="not_safetensors", detail=detail
    )
