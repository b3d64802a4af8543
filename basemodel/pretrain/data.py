"""The procedural captioned dataset: one coloured shape on a plain coloured background.

Images are drawn in batches with signed distance functions (anti-aliased edges), fully on CPU and
deterministically from a ``torch.Generator``. Shapes always stay ``MARGIN`` pixels away from the
border, so the outer frame of every image is pure background (the checker relies on that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Saturated, well separated colours (RGB in [0, 1]); every name is one token of basemodel.tokenizer.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.90, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
RESOLUTION = 32
MARGIN = 3  # pixels around every shape (its anti-aliased edge may reach 1 px into them)
TEMPLATES = [
    "a {fg} {shape} on a {bg} background",
    "a {fg} {shape} on a {bg} background",
    "a {fg} {shape} on a {bg} background",
    "{fg} {shape} on {bg} background",
    "a {size} {fg} {shape} on a {bg} background",
    "a {bg} background with a {fg} {shape}",
]
COLOUR_JITTER = 0.04


def caption(shape: str, fg: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (n, 3, res, res) in [-1, 1]
    shape: torch.Tensor  # (n,) index into SHAPES
    fg: torch.Tensor  # (n,) index into COLOURS
    bg: torch.Tensor  # (n,) index into COLOURS
    captions: list[str]


def _sdf(kind: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each sample's shape; x, y centred, (n, h, w)."""
    ax, ay = x.abs(), y.abs()
    circle = torch.sqrt(x * x + y * y) - r
    # square of half-side 0.85 r (same visual size as the circle)
    s = 0.85 * r
    qx, qy = ax - s, ay - s
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.minimum(
        torch.maximum(qx, qy), torch.zeros_like(qx)
    )
    diamond = (ax + ay - 1.1 * r) / math.sqrt(2.0)
    # upward equilateral triangle, circumradius 1.3 r, centred: intersection of three half-planes
    t = 1.3 * r
    py = -y  # up is positive (image y grows downwards)
    triangle = torch.maximum(-py - t / 2, (math.sqrt(3.0) / 2) * ax + py / 2 - t / 2)
    # plus-shaped cross: union of two bars (half-length r, half-width 0.35 r)
    w = 0.35 * r
    bar1 = torch.maximum(ax - r, ay - w)
    bar2 = torch.maximum(ax - w, ay - r)
    cross = torch.minimum(bar1, bar2)
    stack = torch.stack([circle, square, triangle, diamond, cross], dim=0)  # (5, n, h, w)
    return stack.gather(0, kind.view(1, -1, 1, 1).expand(1, *x.shape)).squeeze(0)


def render(
    shape: torch.Tensor,
    fg_rgb: torch.Tensor,
    bg_rgb: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    r: torch.Tensor,
    resolution: int = RESOLUTION,
) -> torch.Tensor:
    """Draw shapes (n,) with colours (n, 3) at centres/radii (n,) in pixels → (n, 3, res, res) in [0, 1]."""
    coords = torch.arange(resolution, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x = x.unsqueeze(0) - cx.view(-1, 1, 1)
    y = y.unsqueeze(0) - cy.view(-1, 1, 1)
    d = _sdf(shape, x, y, r.view(-1, 1, 1))
    alpha = (0.5 - d).clamp(0.0, 1.0).unsqueeze(1)  # one-pixel anti-aliased edge
    return alpha * fg_rgb.view(-1, 3, 1, 1) + (1 - alpha) * bg_rgb.view(-1, 3, 1, 1)


def place_and_draw(
    shape: torch.Tensor,
    fg_rgb: torch.Tensor,
    bg_rgb: torch.Tensor,
    fg_names: list[str],
    bg: torch.Tensor,
    g: torch.Generator,
    resolution: int = RESOLUTION,
) -> tuple[torch.Tensor, list[str]]:
    """Random size and position for each shape, then the images in [-1, 1] and their captions.

    Draws from ``g`` in a fixed order (radius, x, y, caption template): the shipped weights were trained
    on exactly this stream.
    """
    n = shape.shape[0]
    r = resolution * (0.16 + 0.16 * torch.rand(n, generator=g))  # 5.1 … 10.2 px at 32 px
    extent = 1.3 * r + MARGIN  # every shape fits within 1.3 r of its centre
    span = (resolution - 2 * extent).clamp(min=0)
    cx = extent + span * torch.rand(n, generator=g)
    cy = extent + span * torch.rand(n, generator=g)
    images = render(shape, fg_rgb, bg_rgb, cx, cy, r, resolution) * 2 - 1
    template = torch.randint(len(TEMPLATES), (n,), generator=g).tolist()
    big = (r > resolution * 0.24).tolist()
    captions = [
        TEMPLATES[t].format(
            fg=f, shape=SHAPES[int(s)], bg=COLOURS[int(b)], size="large" if large else "small"
        )
        for t, f, s, b, large in zip(template, fg_names, shape, bg, big, strict=True)
    ]
    return images, captions


def sample_batch(n: int, generator: torch.Generator, resolution: int = RESOLUTION) -> Batch:
    """n random captioned images; the caption template is drawn from TEMPLATES."""
    g = generator
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    fg = torch.randint(len(COLOURS), (n,), generator=g)
    bg = (fg + torch.randint(1, len(COLOURS), (n,), generator=g)) % len(COLOURS)  # bg != fg
    palette = torch.tensor([PALETTE[c] for c in COLOURS])
    jitter = (torch.rand(n, 2, 3, generator=g) * 2 - 1) * COLOUR_JITTER
    fg_rgb = (palette[fg] + jitter[:, 0]).clamp(0, 1)
    bg_rgb = (palette[bg] + jitter[:, 1]).clamp(0, 1)
    images, captions = place_and_draw(shape, fg_rgb, bg_rgb, [COLOURS[int(f)] for f in fg], bg, g, resolution)
    return Batch(images, shape, fg, bg, captions)


def prompt_set(count: int = 48) -> list[tuple[str, str, str]]:
    """A fixed, balanced set of distinct (shape, fg, bg) triples.

    Prompt i has shape ``i mod 5``, shape colour ``i mod 8`` and background ``shape colour + 1 + (i // 8)
    mod 7`` (never the shape colour): for 48 prompts every colour is the shape colour 6 times and the
    background 6 times, and every shape appears 9 or 10 times.
    """
    n = len(COLOURS)
    out = []
    for i in range(count):
        fg = i % n
        bg = (fg + 1 + (i // n) % (n - 1)) % n
        out.append((SHAPES[i % len(SHAPES)], COLOURS[fg], COLOURS[bg]))
    return out
