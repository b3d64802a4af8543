"""Stable Diffusion 1.x: ``StableDiffusionPipeline``, one CLIP ViT-L text encoder, 512 px."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from basemodel.families.base import ModelFamily
from basemodel.families.values import Conditioning, DenoiserInputs, ModelSignals
from basemodel.textual_inversion import Embedding, encode_text


class SD1(ModelFamily):
    name = "sd1"
    label = "SD1.x"
    # the first loads it; inpainting (9-channel UNet) and img2img folders name the other two
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionImg2ImgPipeline",
    )
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    default_resolution = 512
    context_width = 768
    kohya_prefixes = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
    checkpoint_markers = ("model.diffusion_model.", "cond_stage_model.transformer.")
    checkpoint_description = "an SD1.x checkpoint"
    modelspec = "stable-diffusion-v1"
    kohya_version = "sd_v1"
    trainable = True

    def claims(self, signals: ModelSignals) -> bool:
        """A StableDiffusionPipeline (or a bare UNet without added conditioning) that is not SD2.x."""
        if signals.pipeline_class is not None:
            return signals.pipeline_class in self.pipeline_classes
        return signals.unet.get("addition_embed_type") is None

    def problems(self, signals: ModelSignals) -> list[str]:
        found = super().problems(signals)
        if signals.unet.get("addition_embed_type") is not None:
            found.append(f"its UNet has added conditioning {signals.unet['addition_embed_type']!r}")
        if set(signals.components) & {"text_encoder_2", "tokenizer_2"}:
            found.append("it has a second text encoder")
        return found

    def load_kwargs(self, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

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
        """``StableDiffusionPipeline.encode_prompt``: the text encoder's last hidden states; a prompt
        naming ``embeddings`` is encoded with their vectors (``basemodel.textual_inversion``)."""
        embedded = encode_text(self, pipe, prompt, embeddings or {})
        against = encode_text(self, pipe, negative_prompt, embeddings or {}) if guidance else None
        cond, uncond = pipe.encode_prompt(
            prompt,
            device or pipe.unet.device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt or None,
            prompt_embeds=embedded["hidden"] if embedded else None,
            negative_prompt_embeds=against["hidden"] if against else None,
        )
        return Conditioning(DenoiserInputs(cond), DenoiserInputs(uncond) if guidance else None)

    def training_text(
        self,
        pipe: Any,
        tokens: Mapping[str, torch.Tensor],
        frozen: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The text encoder's last hidden states (what ``StableDiffusionPipeline`` conditions on)."""
        return {"hidden": pipe.text_encoder(tokens["text_encoder"], return_dict=False)[0]}
