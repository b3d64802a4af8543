"""Image-to-image and inpainting: loraswap's sampler against diffusers' own pipelines, same model, run.

For each mode (txt2img, img2img, inpaint with the model's 4-channel UNet) it times
``service.engine.sampler.sample`` and the diffusers pipeline a user would call
(``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline`` over
the same modules), alternating, with the same request, and checks that both give the same pixels.
Prints a table (median ms, ratio ours / diffusers, max pixel difference) and writes
``loadtests/results/bench_img2img-<model>.json``.

    python -m loadtests.bench_img2img [--model tiny-sd] [--steps 20] [--repeats 7] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from basemodel.loader import load_base_model
from service.engine.image_modes import ImageInput
from service.engine.sampler import SampleParams, StageTimer, generators_for, sample

RESULTS = Path(__file__).resolve().parent / "results"


def inputs(size: int) -> tuple[Image.Image, Image.Image]:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), 0 * x + 128], axis=-1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(rgb), Image.fromarray(mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as home:
        base = load_base_model(args.model, Path(home), device="cpu", dtype="fp32")
        image, mask = inputs(args.size)
        pipes: dict[str, Any] = {
            "txt2img": base.pipe,
            "img2img": StableDiffusionImg2ImgPipeline(**base.pipe.components),
            "inpaint": StableDiffusionInpaintPipeline(**base.pipe.components),
        }
        rows: list[dict[str, Any]] = []
        for mode, pipe in pipes.items():
            pipe.set_progress_bar_config(disable=True)
            picture = (
                None
                if mode == "txt2img"
                else ImageInput(image, mask if mode == "inpaint" else None, args.strength)
            )
            params = SampleParams(
                "a red circle", "", args.steps, 7.5, args.size, args.size, 1, 1, "ddim", image=picture
            )
            extra: dict[str, Any] = {} if picture is None else {"image": image, "strength": args.strength}
            if mode == "inpaint":
                extra |= {"mask_image": mask, "height": args.size, "width": args.size}
            if mode == "txt2img":
                extra |= {"height": args.size, "width": args.size}
            ours_s, theirs_s, diff = [], [], 0
            for _ in range(args.repeats):
                started = time.perf_counter()
                ours = sample(base.pipe, params, StageTimer())[0]
                ours_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                theirs = pipe(
                    "a red circle",
                    num_inference_steps=args.steps,
                    generator=generators_for(1, 1),
                    **extra,
                ).images[0]
                theirs_s.append(time.perf_counter() - started)
                diff = max(diff, int(np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max()))
            rows.append(
                {
                    "mode": mode,
                    "ours_ms": 1000 * statistics.median(ours_s),
                    "diffusers_ms": 1000 * statistics.median(theirs_s),
                    "max_pixel_diff": diff,
                    "ours_s": ours_s,
                    "diffusers_s": theirs_s,
                }
            )
    print(
        f"{args.model}, {args.size} px, {args.steps} steps, strength {args.strength}, 1 thread, "
        f"median of {args.repeats}"
    )
    print(f"{'mode':<8} {'loraswap ms':>12} {'diffusers ms':>13} {'ratio':>6} {'max diff':>9}")
    for row in rows:
        ratio = row["ours_ms"] / row["diffusers_ms"]
        print(
            f"{row['mode']:<8} {row['ours_ms']:>12.1f} {row['diffusers_ms']:>13.1f} {ratio:>6.2f} "
            f"{row['max_pixel_diff']:>9}"
        )
    out = args.json or RESULTS / f"bench_img2img-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args) | {"json": str(out)}, "rows": rows}, indent=2))
    return 0 if all(row["max_pixel_diff"] <= 1 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
