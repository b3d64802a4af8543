"""Sample grids during training and the final evaluation (similarity, CLIP score) of a run.

Grids: rows are the fixed prompts, columns are (base | adapter) pairs for each fixed seed, saved as
``OUTPUT/samples/step-XXXXXXXX.png`` and ``OUTPUT/samples/final.png``. Base images are generated once
and reused, since the base never changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.conditioning import Conditioner
from training.config import TrainConfig
from training.data.buckets import Size, resize_crop
from training.data.cache import EncodedItem
from training.data.dataset import PreparedData, load_image
from training.evaluate import clip_score, generate, sample_grid
from training.loop import LoopResult
from training.lora import set_adapters_enabled
from training.similarity import compare, latent_distance, pixel_distance

EVAL_SEED = 10_000
SIMILARITY_MEASURE = "latent_stats_distance"


class SampleBook:
    def __init__(
        self,
        conditioner: Conditioner,
        config: TrainConfig,
        prompts: list[str],
        size: Size,
        output: Path,
        *,
        with_text_encoder: bool,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.pipe = conditioner.pipe
        self.family = conditioner.family
        self.denoiser = conditioner.denoiser
        self.text_encoders = conditioner.text_encoders
        self.config = config
        self.prompts = prompts
        self.size = size
        self.folder = output / "samples"
        self.with_text_encoder = with_text_encoder
        self.autocast = autocast
        self._base: list[Image.Image] | None = None
        self._last: list[Image.Image] | None = None

    def _generate(
        self, jobs: list[tuple[str, int]], adapter: bool
    ) -> tuple[list[torch.Tensor], list[Image.Image]]:
        unet, encoders = self.denoiser, self.text_encoders
        was = unet.training, {name: encoder.training for name, encoder in encoders.items()}
        unet.eval()
        for encoder in encoders.values():
            encoder.eval()
        set_adapters_enabled(unet, encoders, adapter, self.with_text_encoder)
        try:
            with self.autocast():
                return generate(
                    self.family,
                    self.pipe,
                    jobs,
                    size=self.size,
                    steps=self.config.sample_steps,
                    guidance_scale=self.config.guidance_scale,
                    negative_prompt=self.config.negative_prompt,
                )
        finally:
            set_adapters_enabled(unet, encoders, True, self.with_text_encoder)
            unet.train(was[0])
            for name, encoder in encoders.items():
                encoder.train(was[1][name])

    def grid(self, name: str, title: str) -> Path:
        seeds = list(self.config.sample_seeds)
        jobs = [(p, s) for p in self.prompts for s in seeds]
        if self._base is None:
            self._base = self._generate(jobs, adapter=False)[1]
        adapter = self._generate(jobs, adapter=True)[1]
        self._last = adapter
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        sample_grid(self._base, adapter, self.prompts, seeds, title).save(path, format="PNG")
        return path

    def grid_at(self, step: int) -> None:
        self.grid(f"step-{step:08d}", f"step {step}: base | lora")

    def evaluate(
        self,
        reference_items: list[EncodedItem],
        data: PreparedData,
        result: LoopResult,
        *,
        clip_model: Path | None,
    ) -> dict[str, Any]:
        """Losses, the similarity measure (base vs adapter) and an optional CLIP score."""
        evaluation: dict[str, Any] = {
            "initial_val_loss": result.initial_val_loss,
            "final_val_loss": result.final_val_loss,
            "best_val_loss": result.best_val_loss,
            "best_val_step": result.best_step,
            "val_loss_improved": (
                result.final_val_loss < result.initial_val_loss
                if result.final_val_loss is not None and result.initial_val_loss is not None
                else None
            ),
            "validation": {"images": len(data.val), "timesteps": self.config.val_timesteps},
        }
        if self.prompts:
            evaluation["final_grid"] = str(self.grid("final", f"final (step {result.step}): base | lora"))
        n = self.config.eval_samples
        if n:
            evaluation["dataset_similarity"] = self._similarity(reference_items, data, n)
        if clip_model is not None and self.prompts:
            prompts = [p for p in self.prompts for _ in self.config.sample_seeds]
            assert self._base is not None and self._last is not None
            evaluation["clip_score"] = compare(
                round(clip_score(clip_model, self._base, prompts), 4),
                round(clip_score(clip_model, self._last, prompts), 4),
            )
        return evaluation

    def _similarity(self, reference_items: list[EncodedItem], data: PreparedData, n: int) -> dict[str, Any]:
        examples = data.val if data.val else data.train
        reference_latents = [item.mean for item in reference_items]
        captions = [e.caption for e in examples]
        prompts = list(itertools.islice(itertools.cycle(captions), n))
        seeds = [EVAL_SEED + i for i in range(n)]
        jobs = list(zip(prompts, seeds, strict=True))
        base_lat, base_img = self._generate(jobs, adapter=False)
        lora_lat, lora_img = self._generate(jobs, adapter=True)
        refs = [resize_crop(load_image(e.path), self.size) for e in examples]
        roundtrip = self._decode(reference_latents)
        latent = {
            "base": latent_distance(base_lat, reference_latents),
            "adapter": latent_distance(lora_lat, reference_latents),
        }
        pixel = {
            "vs_validation_images": {
                "base": pixel_distance(base_img, refs),
                "adapter": pixel_distance(lora_img, refs),
            },
            "vs_vae_roundtrip": {
                "base": pixel_distance(base_img, roundtrip),
                "adapter": pixel_distance(lora_img, roundtrip),
            },
        }
        return {
            "measure": SIMILARITY_MEASURE,
            "reference": "validation set" if data.val else "training set (no validation set)",
            "samples_per_model": n,
            "seeds": seeds,
            **compare(latent["base"]["score"], latent["adapter"]["score"]),
            "latent": latent,
            "pixel": pixel,
            "pixel_closer": {
                "vs_validation_images": pixel["vs_validation_images"]["adapter"]["score"]
                < pixel["vs_validation_images"]["base"]["score"],
                "vs_vae_roundtrip": pixel["vs_vae_roundtrip"]["adapter"]["score"]
                < pixel["vs_vae_roundtrip"]["base"]["score"],
            },
        }

    @torch.no_grad()
    def _decode(self, latents: list[torch.Tensor]) -> list[Image.Image]:
        vae, factor = self.pipe.vae, int(self.pipe.vae_scale_factor)
        images: list[Image.Image] = []
        for lat in latents:
            height, width = lat.shape[-2] * factor, lat.shape[-1] * factor
            packed = self.family.pack(lat[None].to(vae.device, vae.dtype))
            decoded = self.family.decode(self.pipe, packed, height=height, width=width)
            images += self.pipe.image_processor.postprocess(decoded.float(), output_type="pil")
        return images
