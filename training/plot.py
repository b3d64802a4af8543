"""Loss-curve PNG drawn with PIL (no matplotlib): raw and smoothed train loss, validation loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 450
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 40, 50
RAW = (180, 200, 235)
SMOOTH = (30, 90, 200)
VAL = (220, 60, 40)
AXIS = (60, 60, 60)
GRID = (230, 230, 230)


def _ema(values: Sequence[float], weight: float = 0.9) -> list[float]:
    out: list[float] = []
    for value in values:
        out.append(value if not out else weight * out[-1] + (1 - weight) * value)
    return out


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def plot_loss_curve(rows: Sequence[dict[str, Any]], path: Path, title: str = "training loss") -> Path:
    """Draw ``metrics.jsonl`` rows (``step``, ``train_loss``, ``val_loss``) to ``path``."""
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((MARGIN_L, 12), title, fill=AXIS, font=font)
    points = train + val
    if not points:
        draw.text((WIDTH // 2 - 40, HEIGHT // 2), "no data", fill=AXIS, font=font)
        img.save(path)
        return path
    x_lo, x_hi = 0.0, float(max(p[0] for p in points) or 1)
    values = [p[1] for p in points]
    y_lo, y_hi = min(values), max(values)
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w = WIDTH - MARGIN_L - MARGIN_R
    plot_h = HEIGHT - MARGIN_T - MARGIN_B

    def xy(step: float, value: float) -> tuple[float, float]:
        x = MARGIN_L + (step - x_lo) / (x_hi - x_lo) * plot_w
        y = MARGIN_T + (1 - (value - y_lo) / (y_hi - y_lo)) * plot_h
        return x, y

    for tick in _ticks(y_lo, y_hi):
        _, y = xy(x_lo, tick)
        draw.line([(MARGIN_L, y), (WIDTH - MARGIN_R, y)], fill=GRID)
        draw.text((8, y - 6), f"{tick:.4g}", fill=AXIS, font=font)
    for tick in _ticks(x_lo, x_hi):
        x, _ = xy(tick, y_lo)
        draw.line([(x, MARGIN_T), (x, HEIGHT - MARGIN_B)], fill=GRID)
        draw.text((x - 10, HEIGHT - MARGIN_B + 6), f"{tick:g}", fill=AXIS, font=font)
    draw.rectangle([MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B], outline=AXIS)
    draw.text((WIDTH // 2 - 15, HEIGHT - 20), "step", fill=AXIS, font=font)
    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill=RAW, width=1)
        smooth = _ema([v for _, v in train])
        draw.line([xy(s, v) for (s, _), v in zip(train, smooth, strict=True)], fill=SMOOTH, width=2)
    if val:
        if len(val) > 1:
            draw.line([xy(s, v) for s, v in val], fill=VAL, width=2)
        for s, v in val:
            x, y = xy(s, v)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL)
    legend_x = WIDTH - MARGIN_R - 190
    for i, (label, colour) in enumerate(
        (("train (raw)", RAW), ("train (EMA 0.9)", SMOOTH), ("validation", VAL))
    ):
        y = MARGIN_T + 8 + i * 14
        draw.line([(legend_x, y + 5), (legend_x + 20, y + 5)], fill=colour, width=3)
        draw.text((legend_x + 26, y), label, fill=AXIS, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
