"""Prompt-following check for the embedded model (issue 6). Not a test; no downloaded weights.

Generates the fixed prompt set (``basemodel.pretrain.data.prompt_set``: 48 balanced
"a {colour} {shape} on a {colour} background" prompts) × seeds with DDIM, then reads every image with
``basemodel.pretrain.checker`` (border median → background colour; median of the pixels that differ
from it → shape colour; a small CNN on the colour-free shape mask → shape kind) and prints percent
correct per attribute::

    python -m loadtests.check_prompts [--base-model tiny-sd|FOLDER] [--prompts 48] [--seeds 4]
        [--steps 25] [--guidance 4] [--grid docs/images/tiny-sd-grid.png]

Writes ``loadtests/results/check_prompts-<name>.json`` (scores, settings, every reading).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from basemodel.pretrain.checker import procedural_accuracy, read_images, score
from basemodel.pretrain.data import caption, prompt_set
from basemodel.pretrain.evaluate import generate

RESULTS = Path(__file__).resolve().parent / "results"


def load(spec: str) -> tuple[str, Any]:
    from basemodel.loader import load_base_model
    from basemodel.settings import load_settings

    settings = load_settings(base_model=spec)
    base = load_base_model(settings.base_model, settings.models_dir, device="cpu", dtype="fp32")
    return base.name, base.pipe


def save_grid(images: np.ndarray, path: Path, columns: int = 12, scale: int = 3) -> None:
    """First seed's images, ``columns`` per row, upscaled ``scale``× with nearest neighbour."""
    from PIL import Image

    first = images[0]
    rows = -(-len(first) // columns)
    h, w = first.shape[1:3]
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(first):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    ).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-model", default="tiny-sd")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed … first-seed+seeds-1")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LORASWAP_THREADS", "1")))
    parser.add_argument("--grid", type=Path, help="save a PNG grid of the first seed's images")
    parser.add_argument("--json", type=Path, help="results file (default loadtests/results/…)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    name, pipe = load(args.base_model)
    prompts = prompt_set(args.prompts)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    start = time.perf_counter()
    images = generate(pipe, prompts, seeds, args.steps, args.guidance)
    seconds = time.perf_counter() - start
    expected = [p for _ in seeds for p in prompts]
    readings = read_images(images.reshape(-1, *images.shape[2:]))
    result = score(readings, expected)
    checker = procedural_accuracy()
    print(
        f"{name}: {len(prompts)} prompts x {len(seeds)} seeds, "
        f"{args.steps} DDIM steps, guidance {args.guidance}"
    )
    for key in ("background_pct", "shape_colour_pct", "shape_kind_pct", "all_three_pct"):
        print(f"  {key:18s} {result[key]:6.1f}")
    print(f"  generation {seconds:.0f}s; checker on real procedural images: {checker}")
    if args.grid:
        save_grid(images, args.grid)
    out = args.json or RESULTS / f"check_prompts-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "base_model": args.base_model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("grid", "json")},
        "scores": result,
        "checker_on_procedural": checker,
        "generation_seconds": round(seconds, 1),
        "readings": [
            {"prompt": caption(*e), "seed": s, **r.__dict__}
            for (e, s), r in zip(((e, s) for s in seeds for e in prompts), readings, strict=True)
        ],
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
