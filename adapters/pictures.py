"""Pictures an adapter version carries: previews, the training loss curve, the last sample grid.

A picture is user input twice over: its bytes and its name. The bytes must decode as PNG, JPEG or WebP
(checked with Pillow: the header is read first, so a decompression bomb is refused by its declared pixel
count before a pixel is decoded, then the whole file is decoded once). The media type served later is
the one Pillow found, never the one the client claimed. The name is only ever shown as text: it is cut
to its last path segment, stripped of control characters and bounded in length.

Stored content-addressed under ``pictures/sha256/<sha256>.<ext>`` before the version record that lists
them is created, so a crash leaves at most an unreferenced picture (as for adapter blobs).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from basemodel.errors import ImageInvalid, ImageTooLarge, ValidationFailed

PictureRole = Literal["preview", "loss_curve", "samples"]
MediaType = Literal["image/png", "image/jpeg", "image/webp"]
ROLES: tuple[PictureRole, ...] = ("preview", "loss_curve", "samples")
FORMATS: dict[str, tuple[MediaType, str]] = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
}
EXTENSIONS = {media: ext for media, ext in FORMATS.values()}
MAX_NAME_CHARS = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class PictureLimits:
    """How many pictures a version may carry, and how large each may be (``LORASWAP_MAX_PICTURE*``)."""

    max_count: int = 8
    max_bytes: int = 4 << 20
    max_pixels: int = 4096 * 4096


class Picture(BaseModel):
    """One stored picture, as the version record lists it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=MAX_NAME_CHARS, description="Display name (text only).")
    role: PictureRole = "preview"
    media_type: MediaType
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


@dataclass(frozen=True)
class PictureUpload:
    """A picture as given: its bytes, the name it came with and what it shows."""

    data: bytes
    name: str = ""
    role: str = "preview"


@dataclass(frozen=True)
class CheckedPicture:
    """A picture that passed every check: the record entry and the exact bytes to store."""

    picture: Picture
    data: bytes


def picture_key(picture: Picture) -> str:
    return f"pictures/sha256/{picture.sha256}.{EXTENSIONS[picture.media_type]}"


def clean_name(name: str, fallback: str) -> str:
    """A display name: the last path segment, no control or direction characters, bounded."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = _CONTROL.sub("", base).strip()
    return (base or fallback)[:MAX_NAME_CHARS]


def _role(value: str, field: str) -> PictureRole:
    for role in ROLES:
        if value == role:
            return role
    raise ValidationFailed(
        f"picture role {value[:40]!r} is not one of {', '.join(ROLES)}",
        detail={"field": field, "allowed": list(ROLES)},
    )


def check_picture(upload: PictureUpload, limits: PictureLimits, field: str = "picture") -> CheckedPicture:
    """Decode and bound one picture (422 ``image_invalid`` / ``image_too_large``)."""
    role = _role(upload.role, field)
    if not upload.data:
        raise ImageInvalid(f"{field} is empty", detail={"field": field, "reason": "empty"})
    if len(upload.data) > limits.max_bytes:
        raise ImageTooLarge(
            f"{field} is {len(upload.data)} bytes, over the {limits.max_bytes}-byte limit",
            detail={"field": field, "limit": limits.max_bytes, "reason": "bytes"},
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.data)) as image:
                found = image.format or ""
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise ImageTooLarge(
                        f"{field} is {width}x{height}, over the {limits.max_pixels}-pixel limit",
                        detail={"field": field, "limit": limits.max_pixels, "reason": "pixels"},
                    )
                if found not in FORMATS:
                    raise ImageInvalid(
                        f"{field} is {found or 'an unknown format'}; PNG, JPEG or WebP is accepted",
                        detail={"field": field, "reason": "format", "format": found or None},
                    )
                image.load()  # decodes every pixel: a truncated or corrupt file fails here
    except (ImageInvalid, ImageTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(
            f"{field} declares too many pixels", detail={"field": field, "reason": "pixels"}
        ) from None
    except Exception as exc:  # Pillow raises many types for bytes it cannot read
        raise ImageInvalid(
            f"{field} is not a readable image: {type(exc).__name__}",
            detail={"field": field, "reason": "undecodable"},
        ) from None
    media_type, ext = FORMATS[found]
    picture = Picture(
        name=clean_name(upload.name, f"{role}.{ext}"),
        role=role,
        media_type=media_type,
        sha256=hashlib.sha256(upload.data).hexdigest(),
        size=len(upload.data),
        width=width,
        height=height,
    )
    return CheckedPicture(picture, upload.data)


def check_pictures(uploads: Sequence[PictureUpload], limits: PictureLimits) -> list[CheckedPicture]:
    """Check every picture of a registration, and their count (422 above ``max_count``)."""
    if len(uploads) > limits.max_count:
        raise ValidationFailed(
            f"{len(uploads)} pictures given; a version carries at most {limits.max_count}",
            detail={"field": "picture", "limit": limits.max_count, "reason": "count"},
        )
    return [check_picture(u, limits, f"picture[{i}]") for i, u in enumerate(uploads)]
