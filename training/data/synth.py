"""``loraswap data synth``: a small procedurally generated captioned dataset with a distinct style.

Every image is a style-specific background with one to three shapes drawn from the style's palette;
the caption names the shapes, their colours, the background and the style, using words the embedded
tiny-sd tokenizer knows. The same arguments always give the same bytes (fixed seed, PNG output), so
the demo and the tests are reproducible without downloading anything.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFilter

from training.data.dataset import CAPTION_EXTS, IMAGE_EXTS, METADATA
from training.errors import DatasetError, SynthOutputError


def prepare_output(output: Path, overwrite: bool) -> None:
    """Make sure a synth into ``output`` cannot mix with an earlier dataset there.

    A folder that already holds files the dataset reader would read (images, caption files,
    ``metadata.jsonl``; top level or ``val/``) is refused unless ``overwrite``; with it, exactly those
    files are deleted (nothing else is touched).
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DatasetError(f"{output} exists and is not a folder")
    readable = IMAGE_EXTS | set(CAPTION_EXTS)
    stale = [
        path
        for folder in (output, output / "val")
        if folder.is_dir()
        for path in folder.iterdir()
        if path.is_file() and (path.suffix.lower() in readable or path.name == METADATA)
    ]
    if stale and not overwrite:
        raise SynthOutputError(
            f"{output} already holds {len(stale)} dataset files; synthesising into it would mix them with "
            "the new ones"
        )
    for path in stale:
        path.unlink()


RGB = tuple[int, int, int]
SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring", "cross", "hexagon")
CaptionFormat = Literal["txt", "caption", "jsonl"]


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    backgrounds: dict[str, tuple[RGB, RGB]]  # name → (top colour, bottom colour) of a vertical gradient
    palette: dict[str, RGB]
    outline: bool = False
    glow: bool = False
    pixelate: int = 1
    stripes: bool = False


STYLES: dict[str, Style] = {
    "sunset": Style(
        "sunset",
        "warm orange-to-purple gradient skies with gold and red shapes",
        {"orange": ((250, 140, 40), (120, 40, 120)), "pink": ((250, 120, 140), (90, 30, 110))},
        {"gold": (255, 215, 60), "yellow": (255, 240, 90), "red": (220, 40, 40), "white": (255, 245, 230)},
    ),
    "neon": Style(
        "neon",
        "glowing magenta, cyan and green outlines on black",
        {"black": ((5, 5, 12), (15, 10, 30))},
        {"magenta": (255, 40, 220), "cyan": (40, 240, 255), "green": (80, 255, 80)},
        outline=True,
        glow=True,
    ),
    "pastel": Style(
        "pastel",
        "soft pastel shapes on pale cream paper",
        {"white": ((250, 246, 235), (240, 235, 220))},
        {
            "pink": (248, 180, 200),
            "blue": (170, 200, 245),
            "green": (180, 230, 190),
            "yellow": (250, 235, 160),
        },
    ),
    "pixel": Style(
        "pixel",
        "chunky pixel art with a four-colour green palette",
        {"green": ((15, 56, 15), (48, 98, 48))},
        {"green": (139, 172, 15), "white": (200, 220, 150)},
        pixelate=8,
    ),
    "stripes": Style(
        "stripes",
        "bold shapes on blue and white diagonal stripes",
        {"blue": ((30, 60, 160), (30, 60, 160))},
        {"red": (230, 50, 50), "yellow": (255, 220, 40), "black": (20, 20, 20)},
        stripes=True,
    ),
}


def _gradient(size: int, top: RGB, bottom: RGB) -> Image.Image:
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(1, size - 1)
        draw.line(
            [(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    return img


def _polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(rotation + 2 * math.pi * i / sides),
            cy + radius * math.sin(rotation + 2 * math.pi * i / sides),
        )
        for i in range(sides)
    ]


def _star(cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = rotation + math.pi * i / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float], colour: RGB, outline: bool
) -> None:
    cx, cy, r = box
    width = max(2, round(r / 4))
    fill = None if outline else colour
    line = colour if outline else None
    bbox = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(bbox, fill=fill, outline=line, width=width)
    elif shape == "ring":
        draw.ellipse(bbox, outline=colour, width=max(width, round(r / 3)))
    elif shape == "square":
        draw.rectangle(bbox, fill=fill, outline=line, width=width)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=colour)
    else:
        points = {
            "triangle": lambda: _polygon(cx, cy, r, 3, -math.pi / 2),
            "diamond": lambda: _polygon(cx, cy, r, 4, 0.0),
            "hexagon": lambda: _polygon(cx, cy, r, 6, 0.0),
            "star": lambda: _star(cx, cy, r, -math.pi / 2),
        }[shape]()
        if outline:
            draw.line([*points, points[0]], fill=colour, width=width)
        else:
            draw.polygon(points, fill=colour)


def render(style: Style, rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One image and its caption (without trigger word)."""
    scale = 4  # supersampling for smooth edges
    canvas = size * scale
    bg_name = rng.choice(sorted(style.backgrounds))
    img = _gradient(canvas, *style.backgrounds[bg_name])
    draw = ImageDraw.Draw(img)
    if style.stripes:
        step = canvas // 6
        for offset in range(-canvas, canvas * 2, step * 2):
            draw.polygon(
                [
                    (offset, 0),
                    (offset + step, 0),
                    (offset + step - canvas, canvas),
                    (offset - canvas, canvas),
                ],
                fill=(240, 240, 250),
            )
    described = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        shape = rng.choice(SHAPES)
        colour_name = rng.choice(sorted(style.palette))
        radius = rng.uniform(0.12, 0.28) * canvas
        cx, cy = (rng.uniform(radius, canvas - radius) for _ in range(2))
        _draw_shape(draw, shape, (cx, cy, radius), style.palette[colour_name], style.outline)
        described.append(f"{'large' if radius > 0.2 * canvas else 'small'} {colour_name} {shape}")
    if style.glow:
        img = Image.blend(img, img.filter(ImageFilter.GaussianBlur(canvas / 40)), 0.5)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if style.pixelate > 1:
        small = max(1, size // style.pixelate)
        img = img.resize((small, small), Image.Resampling.NEAREST).resize(
            (size, size), Image.Resampling.NEAREST
        )
    things = " and ".join(f"a {d}" for d in described)
    article = "an" if bg_name[0] in "aeiou" else "a"
    return img, f"{things} on {article} {bg_name} background, {style.name} style"


def synth_dataset(
    output: Path,
    *,
    n: int = 64,
    style: str = "sunset",
    size: int = 64,
    seed: int = 0,
    trigger_word: str | None = None,
    caption_format: CaptionFormat = "txt",
    val: int = 0,
) -> list[Path]:
    """Write ``n`` images (+ ``val`` more under ``val/``) with captions; returns the image paths."""
    if style not in STYLES:
        raise DatasetError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if n < 1 or size < 8:
        raise DatasetError("synth needs n >= 1 and size >= 8")
    rng = random.Random(f"{style}:{seed}")
    written = []
    for folder, count in ((Path(output), n), (Path(output) / "val", val)):
        if count == 0:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(count):
            img, caption = render(STYLES[style], rng, size)
            if trigger_word:
                caption = f"{trigger_word}, {caption}"
            path = folder / f"{style}_{index:04d}.png"
            img.save(path, format="PNG", optimize=False)
            written.append(path)
            if caption_format == "jsonl":
                rows.append(json.dumps({"file_name": path.name, "text": caption}))
            else:
                path.with_suffix(f".{caption_format}").write_text(caption + "\n", encoding="utf-8")
        if rows:
            (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return written
