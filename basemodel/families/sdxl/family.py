"""Stable Diffusion XL: ``StableDiffusionXLPipeline``, two CLIP text encoders, ``text_time`` conditioning.

Prompts go through both encoders; their penultimate hidden states are concatenated (768 + 1280 = 2048
wide on the released model) and ``text_encoder_2``'s projected pooled output becomes ``text_embeds``.
``time_ids`` are (original height, width, crop top, left, target height, width) with diffusers'
defaults: the requested size, crop (0, 0). An empty negative prompt gives zero embeddings when the
model says ``force_zeros_for_empty_prompt`` (SDXL base does). The VAE decodes in fp32 when it asks
for it (``force_upcast``) and the model runs in fp16, as diffusers upcasts it.

Training conditions the UNet as diffusers' ``train_text_to_image_lora_sdxl.py`` and kohya sd-scripts
do: the same two penultimate hidden states and pooled projection per caption, and ``time_ids`` from
each image's own original size, the crop taken from it and the size trained at (never the defaults).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from basemodel.errors import BaseModelError
from basemodel.families.base import ModelFamily
from basemodel.families.values import Conditioning, DenoiserInputs, ModelSignals
from basemodel.textual_inversion import Embedding, encode_text

TEXT_TIME = "text_time"
TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2)


class SDXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLImg2ImgPipeline",
    )
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    embedding_parts = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # A1111's SDXL files
    default_resolution = 1024
    context_width = 2048
    kohya_prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    kohya_unet_layout = "ldm"  # sd-scripts trains SDXL on the SGM UNet
    checkpoint_markers = ("model.diffusion_model.", "conditioner.embedders.1.")
    checkpoint_description = "an SDXL checkpoint (conditioner.embedders.* keys)"
    modelspec = "stable-diffusion-xl-v1-base"
    kohya_version = "sdxl_base_v1-0"
    trainable = True
    training_text_keys = ("hidden", "text_embeds")

    def claims(self, signals: ModelSignals) -> bool:
        if signals.pipeline_class is not None:
            return signals.pipeline_class in self.pipeline_classes
        return signals.unet.get("addition_embed_type") == TEXT_TIME

    def problems(self, signals: ModelSignals) -> list[str]:
        found = super().problems(signals)
        if signals.unet.get("addition_embed_type") != TEXT_TIME:
            found.append(f"its UNet has no {TEXT_TIME!r} added conditioning")
        return found

    def load_kwargs(self, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        # The invisible watermark changes pixels and is not part of the model; it is never applied.
        return {"add_watermarker": False}

    def after_load(self, pipe: Any) -> None:
        check_time_embedding(pipe)
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)  # what diffusers' upcast does per call, done once

    def encode(
        self,
        pipe: Any,
        prompt: str,
        negative_prompt: str,
        *,
        num_images: int,
        guidance: bool,
        width: int,
        height: int,
        guidance_scale: float = 0.0,
        device: torch.device | None = None,
        embeddings: Mapping[str, Embedding] | None = None,
    ) -> Conditioning:
        """``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids`` (same values); a prompt
        naming ``embeddings`` is encoded with their vectors (``basemodel.textual_inversion``)."""
        device = device or pipe.unet.device
        embedded = encode_text(self, pipe, prompt, embeddings or {})
        against = encode_text(self, pipe, negative_prompt, embeddings or {}) if guidance else None
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt or None,
            prompt_embeds=embedded["hidden"] if embedded else None,
            pooled_prompt_embeds=embedded["text_embeds"] if embedded else None,
            negative_prompt_embeds=against["hidden"] if against else None,
            negative_pooled_prompt_embeds=against["text_embeds"] if against else None,
        )
        ids = [height, width, 0, 0, height, width]
        time_ids = torch.tensor([ids], dtype=cond.dtype).to(device).repeat(num_images, 1)
        positive = DenoiserInputs(cond, {"text_embeds": pooled, "time_ids": time_ids})
        negative = (
            DenoiserInputs(uncond, {"text_embeds": pooled_uncond, "time_ids": time_ids}) if guidance else None
        )
        return Conditioning(positive, negative)

    def training_text(
        self,
        pipe: Any,
        tokens: Mapping[str, torch.Tensor],
        frozen: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated, and ``text_encoder_2``'s projected
        pooled output (``text_embeds``): ``encode_prompt`` of the pipeline and of the training scripts."""
        hidden = []
        pooled: torch.Tensor | None = None
        for name in self.text_encoders:
            out = getattr(pipe, name)(tokens[name], output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)  # the last encoder's, as diffusers keeps it
        if pooled is None:
            raise BaseModelError("SDXL's text_encoder_2 gave no projected pooled output (text_embeds)")
        return {"hidden": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def size_conditioning(
        self, original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """``time_ids`` = original (height, width) + crop (top, left) + target (height, width), the
        ``add_time_ids`` of diffusers' ``compute_time_ids`` and of sd-scripts' size embeddings."""
        ids = [*original, *crop_top_left, *target]
        return {"time_ids": torch.tensor(ids, dtype=torch.float32)}

    def training_vae_dtype(self, pipe: Any, dtype: torch.dtype) -> torch.dtype:
        """fp32 when training in fp16 and the VAE asks for it (SDXL's overflows in fp16)."""
        if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            return torch.float32
        return dtype

    def encode_image(
        self, pipe: Any, pixels: torch.Tensor, generators: Sequence[torch.Generator], *, normalise: bool
    ) -> torch.Tensor:
        """``StableDiffusionXLImg2ImgPipeline.prepare_latents`` (``normalise``: with the VAE's
        ``latents_mean``/``latents_std`` when it has them) and ``StableDiffusionXLInpaintPipeline.
        _encode_vae_image`` (without): encoded by the VAE in its own dtype (fp32 when upcast)."""
        vae = pipe.vae
        dtype = pixels.dtype
        pixels = pixels.to(vae.dtype)
        rows = [vae.encode(pixels[i : i + 1]).latent_dist.sample(g) for i, g in enumerate(generators)]
        latents = torch.cat(rows).to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if normalise and mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, dtype)
            return (latents - mean_t) * float(vae.config.scaling_factor) / std_t
        return float(vae.config.scaling_factor) * latents

    def begin_denoising(self, scheduler: Any) -> None:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def decode(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        vae = pipe.vae
        latents = latents.to(vae.dtype)  # fp32 when the VAE was upcast (after_load)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        decoded: torch.Tensor = vae.decode(latents, return_dict=False)[0]
        return decoded


def check_time_embedding(pipe: Any) -> None:
    """The UNet's added-embedding input must be 6 time ids plus ``text_encoder_2``'s projection."""
    per_id = int(pipe.unet.config.addition_time_embed_dim)
    projection = int(pipe.text_encoder_2.config.projection_dim)
    expected = int(pipe.unet.add_embedding.linear_1.in_features)
    if per_id * TIME_IDS + projection != expected:
        raise BaseModelError(
            f"the SDXL UNet expects an added embedding of {expected} values, but {TIME_IDS} time ids × "
            f"{per_id} + text_encoder_2's projection {projection} give {per_id * TIME_IDS + projection}",
            hint="The UNet and text_encoder_2 configs do not belong together.",
        )
