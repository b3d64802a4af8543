"""Numeric and visual evaluation: fixed-noise validation loss, sample grids (base vs adapter), the
dataset-similarity measure and an optional CLIP score from a local model.

* Validation loss is comparable across steps: every validation image is noised at the same
  ``val_timesteps`` evenly spaced timesteps (schedule indices: fixed σ on flow-matching bases) with
  noise drawn once from a generator seeded with
  ``seed + VAL_SEED_OFFSET``, the latent is the distribution mean, and the plain (unweighted) MSE is
  averaged. It depends only on the adapter weights.
* Samples use fixed prompts and seeds; base images are generated once (the base never changes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image, ImageDraw, ImageFont

from basemodel.families import ModelFamily
from training.conditioning import Conditioner, Tensors, stack
from training.data.buckets import Size
from training.data.cache import EncodedItem
from training.errors import TrainConfigError
from training.objective import Noised

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 1_000_003
VAL_CHUNK = 16
MIN_TILE = 96


@dataclass
class ValBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    tokens: Tensors
    text: Tensors | None  # cached text conditioning (frozen text encoders)
    added: Tensors  # size conditioning (SDXL time ids)
    frozen: Tensors | None = None  # cached never-trained text part (T5) while a CLIP LoRA trains


class FixedNoising(Protocol):
    """What validation needs of the objective: fixed points of its schedule and noising at them."""

    def validation_points(self, count: int) -> list[int]: ...

    def at(self, latents: torch.Tensor, noise: torch.Tensor, points: list[int]) -> Noised: ...


def build_validation(
    items: Sequence[EncodedItem], objective: FixedNoising, count: int, seed: int
) -> list[ValBatch]:
    """Noised validation latents, fixed once per run (chunks of equal size): the same timesteps
    (DDPM) or σ (flow matching) and noise for every evaluation."""
    generator = torch.Generator().manual_seed(seed + VAL_SEED_OFFSET)
    steps = objective.validation_points(count)
    rows: dict[Size, list[tuple[torch.Tensor, int, torch.Tensor, EncodedItem]]] = {}
    for item in items:
        for step in steps:
            noise = torch.randn(item.mean.shape, generator=generator)
            rows.setdefault(item.size, []).append((item.mean, step, noise, item))
    batches = []
    for group in rows.values():
        for start in range(0, len(group), VAL_CHUNK):
            chunk = group[start : start + VAL_CHUNK]
            latents = torch.stack([r[0] for r in chunk])
            noise = torch.stack([r[2] for r in chunk])
            noised = objective.at(latents, noise, [r[1] for r in chunk])
            texts = [r[3].text for r in chunk if r[3].text is not None]
            frozen = [r[3].frozen for r in chunk if r[3].frozen is not None]
            batches.append(
                ValBatch(
                    noisy=noised.noisy,
                    timesteps=noised.timesteps,
                    target=noised.target,
                    tokens=stack([r[3].tokens for r in chunk]),
                    text=stack(texts) if len(texts) == len(chunk) else None,
                    added=stack([r[3].added for r in chunk]),
                    frozen=stack(frozen) if len(frozen) == len(chunk) else None,
                )
            )
    return batches


@torch.no_grad()
def validation_loss(
    conditioner: Conditioner,
    batches: Sequence[ValBatch],
    *,
    device: torch.device,
    dtype: torch.dtype,
    autocast: AbstractContextManager[Any],
) -> float | None:
    if not batches:
        return None
    unet, encoders = conditioner.denoiser, list(conditioner.text_encoders.values())
    was_training = unet.training, [encoder.training for encoder in encoders]
    unet.eval()
    for encoder in encoders:
        encoder.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with autocast:
                inputs = conditioner.unet_inputs(
                    tokens=batch.tokens,
                    text=batch.text,
                    added=batch.added,
                    device=device,
                    dtype=dtype,
                    frozen=batch.frozen,
                )
                pred = conditioner.predict(batch.noisy.to(device, dtype), batch.timesteps.to(device), inputs)
            err = (pred.float() - batch.target.to(device).float()).pow(2).mean(dim=(1, 2, 3))
            total += float(err.sum())
            count += err.numel()
    finally:
        unet.train(was_training[0])
        for encoder, training in zip(encoders, was_training[1], strict=True):
            encoder.train(training)
    return total / count


@torch.no_grad()
def generate(
    family: ModelFamily,
    pipe: Any,
    jobs: Sequence[tuple[str, int]],
    *,
    size: Size,
    steps: int,
    guidance_scale: float,
    negative_prompt: str,
    batch: int = 8,
) -> tuple[list[torch.Tensor], list[Image.Image]]:
    """One image per (prompt, seed) job: (final latents in the VAE's layout, decoded images). Each image
    has its own CPU generator, so batching and the device do not change what it looks like. The
    family decodes (Flux unpacks; SD3/Flux shift the latents back)."""
    latents: list[torch.Tensor] = []
    images: list[Image.Image] = []
    vae = pipe.vae
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        out = pipe(
            [p for p, _ in chunk],
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            height=size[1],
            width=size[0],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            output_type="latent",
        )
        lat = out.images.to(vae.dtype)
        decoded = family.decode(pipe, lat, height=size[1], width=size[0])
        images += pipe.image_processor.postprocess(decoded.float(), output_type="pil")
        unpacked = family.unpack(pipe, lat, height=size[1], width=size[0])
        latents += [x.float().cpu() for x in unpacked]
    return latents, images


def sample_grid(
    base: Sequence[Image.Image],
    adapter: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    title: str,
) -> Image.Image:
    """Rows = prompts; for each seed a (base | adapter) pair; a label strip on top and per row."""
    font = ImageFont.load_default()
    zoom = max(1, -(-MIN_TILE // adapter[0].width))  # small samples are enlarged (nearest) so labels fit
    if zoom > 1:
        base = [img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST) for img in base]
        adapter = [
            img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST) for img in adapter
        ]
    width, height = adapter[0].size
    cols = 2 * len(seeds)
    label_h, gap = 14, 4
    grid = Image.new(
        "RGB",
        (cols * width + (len(seeds) - 1) * gap, label_h * 2 + len(prompts) * (height + label_h)),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), title, fill="black", font=font)
    for s, seed in enumerate(seeds):
        x = s * (2 * width + gap)
        draw.text((x + 2, label_h + 1), f"base s{seed}", fill="gray", font=font)
        draw.text((x + width + 2, label_h + 1), f"lora s{seed}", fill="black", font=font)
    for p, prompt in enumerate(prompts):
        y = label_h * 2 + p * (height + label_h)
        draw.text((2, y), prompt[: max(10, grid.width // 6)], fill="black", font=font)
        for s in range(len(seeds)):
            x = s * (2 * width + gap)
            grid.paste(base[p * len(seeds) + s], (x, y + label_h))
            grid.paste(adapter[p * len(seeds) + s], (x + width, y + label_h))
    return grid


def clip_score(model_path: Path, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Mean 100 × cosine(image, prompt) of a local CLIP model (``transformers`` folder; no download)."""
    from transformers import CLIPModel, CLIPProcessor

    if not Path(model_path).is_dir():
        raise TrainConfigError(
            f"--clip-model {model_path} is not a local folder", hint="CLIP is never downloaded."
        )
    model = CLIPModel.from_pretrained(model_path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    with torch.no_grad():
        inputs = processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        )
        out = model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return float(100 * (img * txt).sum(-1).clamp(min=0).mean())
