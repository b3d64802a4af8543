"""Untrusted input images (``init_image``, ``mask_image``): base64 → a checked, decoded PIL image.

Two stages, so that refusing costs little:

- ``probe`` (on the request, before the queue admits it): strips an optional ``data:`` URL prefix,
  bounds the encoded and decoded length, decodes base64 strictly, and opens the file with PIL restricted
  to PNG, JPEG and WebP **without decoding pixels**: the size comes from the header and is checked
  against ``max_image_pixels`` first, so a decompression bomb (a small file declaring a huge image) is
  refused before any pixel exists. PIL's own bomb check (``DecompressionBombWarning`` above
  ``Image.MAX_IMAGE_PIXELS``) is turned into the same refusal.
- ``load`` (off the event loop): decodes the first frame (an animated PNG/WebP is reduced to its first
  frame), applies the EXIF orientation (as diffusers' ``load_image`` does), and converts the pixel mode:
  an init image becomes RGB (alpha flattened onto white, as A1111 does; CMYK, palette, grey and 16-bit
  grey converted), a mask becomes one grey channel (its alpha channel when it has a transparent area,
  as A1111's ``create_binary_mask``; else its luminance). 32-bit float images are refused.

Every failure is a 422 with a stable type: ``image_invalid`` (``detail.reason``: ``base64``,
``format``, ``undecodable``, ``mode``, ``size``), ``image_too_large`` (``reason``: ``bytes``,
``pixels``) or, from the caller, ``mask_size_mismatch``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from basemodel.errors import ImageInvalid, ImageTooLarge

FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I
)
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
EXIF_ORIENTATION = 0x0112
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ProbedImage:
    """A decoded-length-checked file whose header was read: format, oriented size, frame count."""

    field: str
    data: bytes
    format: str
    width: int
    height: int
    frames: int


def strip_data_url(value: str, field: str) -> str:
    match = DATA_URL.match(value[:512])
    if match is None:
        return value
    if not match["b64"]:
        raise ImageInvalid(
            f"{field}: a data: URL must be base64-encoded (data:image/png;base64,…)",
            detail={"field": field, "reason": "base64"},
        )
    return value[match.end() :]


def decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    """Strict base64 (whitespace allowed, nothing else), bounded before and after decoding."""
    text = strip_data_url(value, field)
    if len(text) > (max_bytes + 2) // 3 * 4 + len(text) // 76 * 2 + 64:  # allow MIME line breaks
        raise _too_many_bytes(field, max_bytes)
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInvalid(
            f"{field} is not valid base64", detail={"field": field, "reason": "base64"}
        ) from None
    if not data:
        raise ImageInvalid(f"{field} is empty", detail={"field": field, "reason": "undecodable"})
    if len(data) > max_bytes:
        raise _too_many_bytes(field, max_bytes)
    return data


def _too_many_bytes(field: str, limit: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"{field} is larger than the server's limit of {limit} bytes",
        detail={"field": field, "reason": "bytes", "limit": limit},
    )


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """PIL's lazy open (header only), PNG/JPEG/WebP only; PIL's bomb check counts as too large."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_many_pixels(field, max_pixels, None) from None
        except Exception as exc:  # hostile bytes make PIL raise many things; none is our bug
            raise ImageInvalid(
                f"{field} is not a PNG, JPEG or WebP image PIL can read ({type(exc).__name__})",
                detail={"field": field, "reason": "format"},
            ) from None


def _too_many_pixels(field: str, limit: int, size: tuple[int, int] | None) -> ImageTooLarge:
    said = f" ({size[0]}×{size[1]})" if size else ""
    return ImageTooLarge(
        f"{field} declares more pixels{said} than the server's limit of {limit}",
        detail={"field": field, "reason": "pixels", "limit": limit},
    )


def probe(value: str, field: str, *, max_bytes: int, max_pixels: int) -> ProbedImage:
    """Check ``value`` up to the image header; no pixel is decoded."""
    data = decode_base64(value, field, max_bytes)
    with _open(data, field, max_pixels) as image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageInvalid(f"{field} has no pixels", detail={"field": field, "reason": "size"})
        if width * height > max_pixels:
            raise _too_many_pixels(field, max_pixels, (width, height))
        orientation = None
        # PIL's PNG getexif() decodes the image unless an eXIf chunk came before the pixel data
        if image.format != "PNG" or "exif" in image.info:
            try:
                orientation = image.getexif().get(EXIF_ORIENTATION)
            except Exception:  # an unreadable EXIF block is ignored, as PIL's loaders do
                orientation = None
        frames = int(getattr(image, "n_frames", 1) or 1)
        found = str(image.format)
    if orientation in ROTATED:
        width, height = height, width
    return ProbedImage(field, data, found, width, height, frames)


def load(probed: ProbedImage, *, mask: bool = False, max_pixels: int) -> Image.Image:
    """Decode the first frame, apply the EXIF orientation and convert to RGB (``mask``: to ``L``)."""
    field = probed.field
    with _open(probed.data, field, max_pixels) as image:
        try:
            image.seek(0)
            image.load()
            frame = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise ImageInvalid(
                f"{field} could not be decoded ({type(exc).__name__}: {exc})",
                detail={"field": field, "reason": "undecodable"},
            ) from None
    if frame.size != (probed.width, probed.height):
        raise ImageInvalid(
            f"{field} decodes to another size than its header says",
            detail={"field": field, "reason": "undecodable"},
        )
    try:
        return _as_mask(frame, field) if mask else _as_rgb(frame, field)
    except ImageInvalid:
        raise
    except Exception as exc:
        raise ImageInvalid(
            f"{field} has pixel mode {frame.mode!r}, which cannot be converted ({type(exc).__name__})",
            detail={"field": field, "reason": "mode", "mode": frame.mode},
        ) from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _eight_bit(image: Image.Image, field: str) -> Image.Image:
    """16/32-bit integer grey (``I;16*``, ``I``) → 8-bit ``L`` by dropping the low byte; float refused."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ImageInvalid(
            f"{field}: 32-bit floating-point images are not accepted",
            detail={"field": field, "reason": "mode", "mode": image.mode},
            hint="Send an 8- or 16-bit PNG, a JPEG or a WebP.",
        )
    return image


def _as_rgb(image: Image.Image, field: str) -> Image.Image:
    image = _eight_bit(image, field)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _as_mask(image: Image.Image, field: str) -> Image.Image:
    image = _eight_bit(image, field)
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image if image.mode == "L" else image.convert("L")
