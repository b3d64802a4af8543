"""New concepts for "a LoRA you can see": things the pretrained embedded model never saw.

A concept is a new **shape colour** (a name that is one token of ``basemodel.tokenizer`` but never
appears in the pretraining captions, plus its RGB). Everything that must agree lives here:

- ``sample_concept_batch`` draws training images exactly like ``data.sample_batch`` (same renderer,
  sizes, positions, colour jitter and caption templates) except that the shape has the concept colour;
- ``concept_prompt_set`` is the fixed (shape, background) set the concept score is measured on;
- ``concept_palette`` is the checker's palette for reading a concept image: the 8 base colours plus the
  concept colour. The base 8-colour scoring (``checker.score``) does not use it and is unchanged.

The concept score of a model is the percentage of images generated from
``"{trigger}, a {concept} {shape} on a {bg} background"`` whose shape colour reads as the concept colour.

The default concept is brown. It has to be a colour the base model does not draw when asked for an
unknown colour word, and one its VAE can draw at all (the VAE only ever saw the eight base colours):

- pink: the base model's shape for an unknown colour word is pale and pinkish (mean RGB (0.75, 0.58,
  0.64) over the 40 concept prompts) and reads as pink 70% of the time, so pink shows little;
- cyan: the VAE cannot draw it: perfect cyan images come back through it as (0.22, 0.50, 0.68) and read
  as cyan only 34% of the time (teal 73%), so no adapter can reach a high cyan score;
- brown: the base model reads brown 15% of the time (one seed), VAE round trips read brown 84%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from basemodel.pretrain.data import (
    COLOUR_JITTER,
    COLOURS,
    PALETTE,
    RESOLUTION,
    SHAPES,
    Batch,
    caption,
    place_and_draw,
)

DEFAULT_TRIGGER = "sks"


@dataclass(frozen=True)
class Concept:
    name: str  # the colour word used in captions and prompts
    rgb: tuple[float, float, float]
    description: str


CONCEPTS: dict[str, Concept] = {
    # Nearest base colour is red at RGB distance 0.40 (orange 0.52, black 0.56); the base model's
    # unknown-colour shape is 0.64 away.
    "brown": Concept("brown", (0.55, 0.3, 0.1), "a new shape colour, brown, never seen in pretraining"),
    # Nearest base colour is white at RGB distance 0.45 (purple 0.59, orange 0.75, red 0.79); too close
    # to what the current base model draws for an unknown colour word (see above).
    "pink": Concept("pink", (0.98, 0.55, 0.75), "a new shape colour, pink, never seen in pretraining"),
}
DEFAULT_CONCEPT = "brown"


def get_concept(name: str) -> Concept:
    try:
        return CONCEPTS[name]
    except KeyError:
        raise ValueError(f"unknown concept {name!r}; choose one of {', '.join(CONCEPTS)}") from None


def concept_palette(concept: Concept) -> dict[str, tuple[float, float, float]]:
    """The base palette plus the concept colour (for reading concept images only)."""
    return {**PALETTE, concept.name: concept.rgb}


def with_trigger(text: str, trigger: str | None) -> str:
    return f"{trigger}, {text}" if trigger else text


def concept_caption(concept: Concept, shape: str, bg: str, trigger: str | None = DEFAULT_TRIGGER) -> str:
    """``"sks, a brown circle on a blue background"``: the prompt the concept score uses."""
    return with_trigger(caption(shape, concept.name, bg), trigger)


def sample_concept_batch(
    concept: Concept, n: int, generator: torch.Generator, resolution: int = RESOLUTION
) -> Batch:
    """n images like ``data.sample_batch`` but with the concept colour as shape colour.

    Geometry, jitter and caption templates are ``data.sample_batch``'s (``data.place_and_draw``).
    ``Batch.fg`` is -1 (the concept colour is not a base palette index);
    captions carry no trigger word (``with_trigger`` adds it).
    """
    g = generator
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    bg = torch.randint(len(COLOURS), (n,), generator=g)
    palette = torch.tensor([PALETTE[c] for c in COLOURS])
    jitter = (torch.rand(n, 2, 3, generator=g) * 2 - 1) * COLOUR_JITTER
    fg_rgb = (torch.tensor(concept.rgb).expand(n, 3) + jitter[:, 0]).clamp(0, 1)
    bg_rgb = (palette[bg] + jitter[:, 1]).clamp(0, 1)
    images, captions = place_and_draw(shape, fg_rgb, bg_rgb, [concept.name] * n, bg, g, resolution)
    return Batch(images, shape, torch.full((n,), -1), bg, captions)


def concept_prompt_set(count: int = 40) -> list[tuple[str, str]]:
    """A fixed, balanced list of distinct (shape, background) pairs for the concept prompts.

    Pair i has shape ``i mod 5`` and background ``i mod 8``: the first 40 cover every pair once.
    """
    return [(SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)]) for i in range(count)]


def concept_score(readings: list[Any], concept: Concept, backgrounds: list[str]) -> dict[str, Any]:
    """Percent of readings (made with ``concept_palette``) whose shape colour is the concept colour.

    ``backgrounds`` are the prompts' backgrounds (scored too, as a check that the rest of the prompt
    still holds). ``shape_colour_counts`` shows what the shape colours read as instead.
    """
    n = len(readings)
    hits = sum(r.shape_colour == concept.name for r in readings)
    bg_hits = sum(r.background == b for r, b in zip(readings, backgrounds, strict=True))
    counts: dict[str, int] = {}
    for r in readings:
        key = r.shape_colour or "none"
        counts[key] = counts.get(key, 0) + 1
    return {
        "concept_pct": 100.0 * hits / n,
        "background_pct": 100.0 * bg_hits / n,
        "images": float(n),
        "shape_colour_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }


def read_concept_images(images: Any, concept: Concept, classifier: Any = None) -> list[Any]:
    """``checker.read_images`` with the concept colour added to the shape-colour palette."""
    from basemodel.pretrain.checker import read_images

    return read_images(images, classifier, shape_palette=concept_palette(concept))


def concept_procedural_accuracy(concept: Concept, n: int = 256, seed: int = 4321) -> dict[str, Any]:
    """The concept reading on real procedural concept images (what a perfect adapter would draw)."""
    batch = sample_concept_batch(concept, n, torch.Generator().manual_seed(seed))
    readings = read_concept_images((batch.images + 1) / 2, concept)
    return concept_score(readings, concept, [COLOURS[int(b)] for b in batch.bg])
