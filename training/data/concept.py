"""``loraswap data synth --concept brown``: a dataset that teaches the embedded model something new.

The images are in the pretrained ``tiny-sd`` domain (``basemodel.pretrain``: one shape on a plain
background, 32 px, the same renderer, sizes, positions and colour jitter), but the shape has a colour
the base model never saw (``basemodel.pretrain.concepts``). Concept captions start with the trigger
word: ``"sks, a brown circle on a blue background"`` (and the pretraining caption variants).

A share of **regularisation** images (``regularisation``, default 0.5) are ordinary pretraining-domain
images with their ordinary captions and no trigger word, so the adapter learns "trigger + brown → brown"
without drifting on prompts that do not use it. Captions are final as written: train with
``--caption-template "{caption}"`` so the trainer does not add the trigger word to them.

Validation images (``val/``) are concept images only. The same arguments always give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from basemodel.pretrain.concepts import (
    DEFAULT_CONCEPT,
    DEFAULT_TRIGGER,
    get_concept,
    sample_concept_batch,
    with_trigger,
)
from basemodel.pretrain.data import RESOLUTION, Batch, sample_batch
from training.data.synth import CaptionFormat
from training.errors import DatasetError

DEFAULT_REGULARISATION = 0.5


def _pngs(batch: Batch) -> list[Image.Image]:
    pixels = ((batch.images + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in pixels]


def synth_concept_dataset(
    output: Path,
    *,
    concept: str = DEFAULT_CONCEPT,
    n: int = 64,
    val: int = 0,
    seed: int = 0,
    trigger_word: str | None = DEFAULT_TRIGGER,
    regularisation: float = DEFAULT_REGULARISATION,
    size: int = RESOLUTION,
    caption_format: CaptionFormat = "txt",
) -> list[Path]:
    """Write ``n`` training images (``round(n * regularisation)`` of them ordinary) and ``val`` concept
    images under ``val/``, with captions; returns the image paths."""
    try:
        spec = get_concept(concept)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    if n < 1 or val < 0 or size < 16:
        raise DatasetError("synth --concept needs n >= 1, val >= 0 and size >= 16")
    if not 0.0 <= regularisation < 1.0:
        raise DatasetError("regularisation must be in [0, 1)")
    regular = round(n * regularisation)
    plan = [
        (Path(output), f"{spec.name}_", True, n - regular, 0),
        (Path(output), "regular_", False, regular, 1),
        (Path(output) / "val", f"{spec.name}_", True, val, 2),
    ]
    written: list[Path] = []
    rows: dict[Path, list[str]] = {}
    for folder, prefix, is_concept, count, stream in plan:
        if count == 0:
            continue
        generator = torch.Generator().manual_seed(seed * 1009 + stream)
        if is_concept:
            batch = sample_concept_batch(spec, count, generator, size)
            captions = [with_trigger(c, trigger_word) for c in batch.captions]
        else:
            batch = sample_batch(count, generator, size)
            captions = batch.captions  # ordinary pretraining captions, no trigger word
        folder.mkdir(parents=True, exist_ok=True)
        for index, (image, text) in enumerate(zip(_pngs(batch), captions, strict=True)):
            path = folder / f"{prefix}{index:04d}.png"
            image.save(path, format="PNG", optimize=False)
            written.append(path)
            if caption_format == "jsonl":
                rows.setdefault(folder, []).append(json.dumps({"file_name": path.name, "text": text}))
            else:
                path.with_suffix(f".{caption_format}").write_text(text + "\n", encoding="utf-8")
    for folder, lines in rows.items():
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written
