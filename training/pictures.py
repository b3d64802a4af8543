"""The pictures a run gives its registered version: the loss curve and the last sample grid.

``loraswap train --register`` stores them with the version (``adapters/pictures.py``), so the console
and ``GET /v1/adapters/{id}/versions/{v}`` show them wherever the store is. A picture over the store's
limits (a big SDXL grid) is scaled down and sent as JPEG rather than failing the registration.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from adapters.pictures import PictureLimits, PictureUpload

LOSS_CURVE = "loss_curve.png"


def last_grid(output: Path) -> Path | None:
    """``samples/final.png``, else the latest ``samples/step-*.png``; None when no grid was drawn."""
    folder = output / "samples"
    final = folder / "final.png"
    if final.is_file():
        return final
    steps = sorted(folder.glob("step-*.png"))
    return steps[-1] if steps else None


def fitted(path: Path, limits: PictureLimits) -> bytes:
    """The file's bytes, or a scaled-down JPEG when the file is over ``limits``."""
    data = path.read_bytes()
    with Image.open(path) as image:
        pixels = image.width * image.height
        if len(data) <= limits.max_bytes and pixels <= limits.max_pixels:
            return data
        quality, scale = 90, min(1.0, (limits.max_pixels / pixels) ** 0.5)
        rgb = image.convert("RGB")
    while True:
        size = (max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale)))
        out = io.BytesIO()
        rgb.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=quality)
        if out.tell() <= limits.max_bytes or size == (1, 1):
            return out.getvalue()
        scale *= 0.7


def run_pictures(output: Path, limits: PictureLimits) -> list[PictureUpload]:
    """The run's loss curve and last sample grid, as registration pictures (whichever exist)."""
    found = [(output / LOSS_CURVE, "loss_curve"), (last_grid(output), "samples")]
    pictures = []
    for path, role in found:
        if path is not None and path.is_file():
            data = fitted(path, limits)
            name = path.name if data == path.read_bytes() else f"{path.stem}.jpg"
            pictures.append(PictureUpload(data, name, role))
    return pictures[: limits.max_count]
