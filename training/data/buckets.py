"""Target sizes: one square size, or aspect-ratio buckets (kohya/SimpleTuner style), plus the
resize-then-center-crop that turns an image into a ``[-1, 1]`` tensor of exactly that size, and where
that crop lies (``Crop``: what SDXL's size/crop time ids record per image)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[Size]:
    """Sizes with about ``resolution²`` pixels (never more), sides multiples of ``multiple``, aspect
    ratio within ``1/max_ratio … max_ratio``; always contains the square ``resolution × resolution``."""
    square = (resolution // multiple) * multiple
    buckets = {(square, square)}
    area = resolution * resolution
    width = multiple
    while width <= resolution * max_ratio:
        height = (area // width) // multiple * multiple
        if height >= multiple and 1 / max_ratio <= width / height <= max_ratio:
            buckets.add((width, height))
        width += multiple
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket with the closest aspect ratio (log distance), ties to the larger area."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def square_size(resolution: int, multiple: int) -> Size:
    side = (resolution // multiple) * multiple
    return side, side


@dataclass(frozen=True)
class Crop:
    """How ``resize_crop`` turns an ``original`` (width, height) image into ``target``: scaled by
    ``scale`` to ``scaled``, then cut at ``(left, top)`` of the scaled image."""

    original: Size
    scale: float
    scaled: Size
    left: int
    top: int
    target: Size

    def top_left(self, flipped: bool = False) -> tuple[int, int]:
        """(top, left) of the crop; ``flipped``: in the mirrored image (the crop of a flipped sample)."""
        left = self.scaled[0] - self.target[0] - self.left if flipped else self.left
        return self.top, left


def crop_geometry(width: int, height: int, size: Size) -> Crop:
    """The resize and center crop ``resize_crop`` applies to a ``width`` x ``height`` image."""
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    scaled = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    left = (scaled[0] - target_w) // 2
    top = (scaled[1] - target_h) // 2
    return Crop((width, height), scale, scaled, left, top, size)


def resize_crop(img: Image.Image, size: Size) -> Image.Image:
    """Scale so the image covers ``size`` (aspect kept), then center-crop to exactly ``size``."""
    crop = crop_geometry(img.width, img.height, size)
    if crop.scaled != img.size:
        resample = Image.Resampling.BICUBIC if crop.scale > 1 else Image.Resampling.LANCZOS
        img = img.resize(crop.scaled, resample)
    width, height = size
    return img.crop((crop.left, crop.top, crop.left + width, crop.top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor ``(3, H, W)`` in ``[-1, 1]``."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor ``(3, H, W)`` in ``[-1, 1]`` → RGB PIL image."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
    return Image.fromarray(array.numpy(), "RGB")
