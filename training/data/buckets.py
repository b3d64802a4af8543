"""Target sizes: one square size, or aspect-ratio buckets (kohya/SimpleTuner style), plus the
resize-then-center-crop that turns an image into a ``[-1, 1]`` tensor of exactly that size."""

from __future__ import annotations

import math

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


def resize_crop(img: Image.Image, size: Size) -> Image.Image:
    """Scale so the image covers ``size`` (aspect kept), then center-crop to exactly ``size``."""
    width, height = size
    scale = max(width / img.width, height / img.height)
    new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor ``(3, H, W)`` in ``[-1, 1]``."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor ``(3, H, W)`` in ``[-1, 1]`` → RGB PIL image."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
    return Image.fromarray(array.numpy(), "RGB")
