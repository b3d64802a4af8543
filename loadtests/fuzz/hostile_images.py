"""Hostile and awkward input images for ``init_image`` / ``mask_image``, built in code (no files).

Each ``ImageCase`` is a set of request fields with the status and error type it must get: undecodable
bytes, base64 garbage, formats other than PNG/JPEG/WebP, truncated files, decompression bombs (PNG
headers that declare far more pixels than the file holds; refused before decoding), masks of another
size, and — accepted, converted — animated PNGs, CMYK JPEGs, LA/P/RGBA/16-bit PNGs, WebP and EXIF
rotation. Used by ``api_hostile.image_cases`` (the API fuzzer) and ``tests/service/test_image_inputs.py``.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

SIZE = 32


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sample(size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> Image.Image:
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    return image if mode == "RGB" else image.convert(mode)


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR rewritten to declare ``width`` × ``height`` (CRC fixed): a bomb header."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + ihdr
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def apng() -> bytes:
    """A two-frame animated PNG; the first frame is ``sample()``."""
    first, second = sample(), sample().transpose(Image.Transpose.ROTATE_90)
    return encode(first, "PNG", save_all=True, append_images=[second])


def rotated_jpeg() -> bytes:
    """A 32×48 JPEG whose EXIF orientation (6) says: show it rotated, 48×32."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(sample((SIZE, 48)), "JPEG", exif=exif, quality=95)


def sixteen_bit_png() -> bytes:
    grey = (np.asarray(sample().convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(grey), "PNG")  # uint16 → mode I;16


@dataclass(frozen=True)
class ImageCase:
    label: str
    fields: dict[str, Any]  # request fields besides prompt/steps
    status: int
    error_type: str | None = None  # the error's type when refused
    reason: str | None = None  # detail.reason when refused


def image_cases() -> list[ImageCase]:
    png = encode(sample())
    mask = encode(sample().convert("L"))
    return [
        ImageCase("garbage-base64", {"init_image": "not base64 at all!"}, 422, "image_invalid", "base64"),
        ImageCase(
            "data-url-not-base64", {"init_image": "data:image/png,abc"}, 422, "image_invalid", "base64"
        ),
        ImageCase("random-bytes", {"init_image": b64(bytes(range(256)) * 4)}, 422, "image_invalid", "format"),
        ImageCase("empty", {"init_image": ""}, 422, "image_invalid", "undecodable"),
        ImageCase("gif", {"init_image": b64(encode(sample(), "GIF"))}, 422, "image_invalid", "format"),
        ImageCase("bmp", {"init_image": b64(encode(sample(), "BMP"))}, 422, "image_invalid", "format"),
        ImageCase(
            "truncated-png", {"init_image": b64(png[: len(png) // 2])}, 422, "image_invalid", "undecodable"
        ),
        ImageCase(
            "bomb-png-huge",
            {"init_image": b64(with_png_size(png, 100_000, 100_000))},
            422,
            "image_too_large",
            "pixels",
        ),
        ImageCase(
            "bomb-png-5000",
            {"init_image": b64(with_png_size(png, 5000, 5000))},
            422,
            "image_too_large",
            "pixels",
        ),
        ImageCase(
            "mask-other-size",
            {"init_image": b64(png), "mask_image": b64(encode(sample((24, 32)).convert("L")))},
            422,
            "mask_size_mismatch",
        ),
        ImageCase(
            "mask-garbage", {"init_image": b64(png), "mask_image": "%%%"}, 422, "image_invalid", "base64"
        ),
        ImageCase("mask-without-image", {"mask_image": b64(mask)}, 422, "validation_error"),
        ImageCase("strength-no-step", {"init_image": b64(png), "strength": 0.1}, 422, "validation_error"),
        ImageCase("control:png", {"init_image": b64(png)}, 200),
        ImageCase("control:data-url", {"init_image": "data:image/png;base64," + b64(png)}, 200),
        ImageCase("control:inpaint", {"init_image": b64(png), "mask_image": b64(mask)}, 200),
        ImageCase("convert:webp", {"init_image": b64(encode(sample(), "WEBP", lossless=True))}, 200),
        ImageCase("convert:cmyk-jpeg", {"init_image": b64(encode(sample(mode="CMYK"), "JPEG"))}, 200),
        ImageCase("convert:la-png", {"init_image": b64(encode(sample(mode="LA")))}, 200),
        ImageCase("convert:p-png", {"init_image": b64(encode(sample(mode="P")))}, 200),
        ImageCase("convert:rgba-png", {"init_image": b64(encode(sample(mode="RGBA")))}, 200),
        ImageCase("convert:16-bit-png", {"init_image": b64(sixteen_bit_png())}, 200),
        ImageCase("convert:animated-png", {"init_image": b64(apng())}, 200),
        # shown 48×32; resized to 32×32, within the fuzz server's 32 px limits
        ImageCase(
            "convert:exif-rotated", {"init_image": b64(rotated_jpeg()), "width": 32, "height": 32}, 200
        ),
    ]
