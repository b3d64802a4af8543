"""Generate the fixed prompt set with a pipeline and score it with the checker.

Used by ``loadtests/check_prompts.py`` (the reported numbers), the LoRA demo, and ``pretrain-tiny
--eval-every`` (scores logged while training, on seeds that the reported check does not use).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from basemodel.pretrain.checker import ShapeClassifier, read_images, score
from basemodel.pretrain.data import caption, prompt_set

TARGETS = {"background_pct": 90.0, "shape_colour_pct": 80.0, "shape_kind_pct": 70.0}


@torch.no_grad()
def generate_texts(pipe: Any, texts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """uint8 images (len(seeds), len(texts), h, w, 3).

    Image (s, p) starts from torch seed ``seeds[s] * 1000 + p`` (CPU generators, so the starting noise is
    the same on every device).
    """
    out = []
    for seed in seeds:
        generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(texts))]
        images = pipe(
            prompt=texts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images
        out.append((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.stack(out)


def generate(
    pipe: Any, prompts: list[tuple[str, str, str]], seeds: list[int], steps: int, guidance: float
) -> np.ndarray:
    """uint8 images (len(seeds), len(prompts), h, w, 3) for (shape, fg, bg) prompts."""
    return generate_texts(pipe, [caption(*p) for p in prompts], seeds, steps, guidance)


def prompt_scores(
    pipe: Any,
    seeds: list[int],
    prompts: int = 48,
    steps: int = 25,
    guidance: float = 4.0,
    classifier: ShapeClassifier | None = None,
) -> dict[str, float]:
    """The checker's percentages for ``prompt_set(prompts)`` × ``seeds``."""
    chosen = prompt_set(prompts)
    images = generate(pipe, chosen, seeds, steps, guidance)
    readings = read_images(images.reshape(-1, *images.shape[2:]), classifier)
    return score(readings, [p for _ in seeds for p in chosen])


def target_margin(scores: dict[str, float]) -> float:
    """min over attributes of score / target: ≥ 1 when every issue-6 target is met."""
    return min(scores[key] / target for key, target in TARGETS.items())
