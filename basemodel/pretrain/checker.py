"""Measure prompt following on the procedural domain, with no downloaded weights.

For an RGB image and its prompt's (shape, shape colour, background colour):

- **background colour**: the per-channel median of the outer ``FRAME``-pixel border (the dataset keeps
  every shape ``MARGIN`` = 3 px inside), snapped to the nearest ``PALETTE`` colour;
- **shape colour**: pixels farther than ``FG_DISTANCE`` from that background median form the shape
  mask; the median of the mask's core pixels, snapped to the nearest palette colour;
- **shape kind**: a small CNN (``ShapeClassifier``, ~25 k params) classifies the soft mask (colour-free,
  so it generalises across colour pairs). It is trained on the procedural data itself, with noise and
  blur augmentation, and shipped as ``basemodel/weights/shape-classifier.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from basemodel.pretrain.data import COLOURS, PALETTE, RESOLUTION, SHAPES, sample_batch

FRAME = 2
FG_DISTANCE = 0.25
CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "weights" / "shape-classifier.safetensors"
_PALETTE = torch.tensor([PALETTE[c] for c in COLOURS])


@dataclass(frozen=True)
class Reading:
    background: str
    shape_colour: str | None
    shape: str | None
    foreground_pixels: int


class ShapeClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, len(SHAPES))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(mask).amax(dim=(2, 3)))


def _to_tensor(images: Any) -> torch.Tensor:
    """uint8 (n, h, w, 3) / float [0, 1] arrays or tensors, or PIL images → float (n, 3, 32, 32) in [0, 1]."""
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    x = torch.as_tensor(np.asarray(images))
    if x.dtype == torch.uint8:
        x = x.float() / 255
    x = x.float()
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[-1] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return x.clamp(0, 1)


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[float, float, float]] | None = None) -> list[str]:
    if palette is None:
        names, table = COLOURS, _PALETTE
    else:
        names, table = list(palette), torch.tensor(list(palette.values()))
    return [names[int(i)] for i in torch.cdist(rgb, table).argmin(dim=1)]


def _background(x: torch.Tensor) -> torch.Tensor:
    frame = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return x[:, :, frame].median(dim=2).values  # (n, 3)


def soft_masks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, h, w) in [0, 1] → distance-from-background maps (n, 1, h, w) and background medians (n, 3)."""
    bg = _background(x)
    distance = (x - bg.view(-1, 3, 1, 1)).norm(dim=1, keepdim=True)
    return distance, bg


def classifier_input(distance: torch.Tensor) -> torch.Tensor:
    """Normalised soft mask: 0 = background, 1 = clearly foreground."""
    return (distance / FG_DISTANCE).clamp(0, 2) / 2


def load_classifier(path: Path = CLASSIFIER_PATH) -> ShapeClassifier:
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def read_images(
    images: Any,
    classifier: ShapeClassifier | None = None,
    *,
    shape_palette: dict[str, tuple[float, float, float]] | None = None,
) -> list[Reading]:
    """Read every image. ``shape_palette`` (default ``PALETTE``) is the set of names the shape colour
    snaps to; concept scoring passes ``concepts.concept_palette`` (the background always uses ``PALETTE``).
    """
    x = _to_tensor(images)
    classifier = classifier or load_classifier()
    distance, bg = soft_masks(x)
    backgrounds = _nearest(bg)
    kinds = classifier(classifier_input(distance)).argmax(dim=1).tolist()
    readings = []
    for i in range(x.shape[0]):
        mask = distance[i, 0] > FG_DISTANCE
        count = int(mask.sum())
        if count < 3:
            readings.append(Reading(backgrounds[i], None, None, count))
            continue
        core = distance[i, 0] >= distance[i, 0][mask].median()  # the most distinct half: no edge blend
        colour = _nearest(x[i][:, core & mask].median(dim=1).values.view(1, 3), shape_palette)[0]
        readings.append(Reading(backgrounds[i], colour, SHAPES[kinds[i]], count))
    return readings


def score(readings: list[Reading], expected: list[tuple[str, str, str]]) -> dict[str, float]:
    """Percent correct per attribute; ``expected`` holds (shape, shape colour, background) triples."""
    n = len(expected)
    bg = sum(r.background == b for r, (_, _, b) in zip(readings, expected, strict=True))
    fg = sum(r.shape_colour == f for r, (_, f, _) in zip(readings, expected, strict=True))
    kind = sum(r.shape == s for r, (s, _, _) in zip(readings, expected, strict=True))
    every = sum(
        r.background == b and r.shape_colour == f and r.shape == s
        for r, (s, f, b) in zip(readings, expected, strict=True)
    )
    return {
        "background_pct": 100.0 * bg / n,
        "shape_colour_pct": 100.0 * fg / n,
        "shape_kind_pct": 100.0 * kind / n,
        "all_three_pct": 100.0 * every / n,
        "images": float(n),
    }


def procedural_accuracy(
    n: int = 512, seed: int = 1234, classifier: ShapeClassifier | None = None
) -> dict[str, float]:
    """The checker's own accuracy on real procedural images (fresh seed, never used for training)."""
    batch = sample_batch(n, torch.Generator().manual_seed(seed))
    readings = read_images((batch.images + 1) / 2, classifier)
    expected = [
        (SHAPES[int(s)], COLOURS[int(f)], COLOURS[int(b)])
        for s, f, b in zip(batch.shape, batch.fg, batch.bg, strict=True)
    ]
    return score(readings, expected)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise, colour blotches and blur, so the classifier tolerates diffusion artefacts."""
    n = x.shape[0]
    x = x + torch.randn(x.shape, generator=g) * 0.08 * torch.rand(n, 1, 1, 1, generator=g)
    blotch = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=x.shape[-2:], mode="bilinear")
    x = x + blotch * 0.06 * torch.rand(n, 1, 1, 1, generator=g)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float()
    return (pick * blurred + (1 - pick) * x).clamp(0, 1)


def train_classifier(steps: int = 800, batch: int = 64, seed: int = 0) -> ShapeClassifier:
    """Deterministic for a seed (set threads to 1 for byte-identical results)."""
    torch.manual_seed(seed)
    model = ShapeClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 100)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (0.05 + 0.95 * (1 - step / steps))
        data = sample_batch(batch, g)
        x = _augment((data.images + 1) / 2, g)
        distance, _ = soft_masks(x)
        loss = F.cross_entropy(model(classifier_input(distance)), data.shape)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    """``python -m basemodel.pretrain.checker``: retrain and save the shipped shape classifier."""
    torch.set_num_threads(1)
    model = train_classifier()
    CLASSIFIER_PATH.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER_PATH))
    print(procedural_accuracy(classifier=model))


if __name__ == "__main__":
    main()
