"""SD3 / SD3.5: ``StableDiffusion3Pipeline``, an MMDiT transformer, CLIP-L + CLIP-G + T5.

Everything follows ``StableDiffusion3Pipeline.__call__`` (diffusers 0.42):

* prompts: both CLIPs' penultimate hidden states concatenated and zero-padded to the T5 width, then
  T5's last hidden states appended (``max_sequence_length`` 256) → ``encoder_hidden_states``; both
  CLIPs' projected pooled outputs concatenated → ``pooled_projections``. Without T5 (``text_encoder_3``
  None, as diffusers allows) its part is zeros. An empty negative prompt encodes "" (diffusers' rule).
* guidance: classifier-free, ``guidance_scale`` (7.0 in diffusers; > 1 turns it on).
* latents: noise ``[rows, in_channels, h/8, w/8]``; the transformer takes the timestep as is (σ·1000).
* schedule: FlowMatchEuler with the static ``shift`` of the scheduler config (3.0); dynamic shifting
  (``use_dynamic_shifting``) takes ``mu`` from the patch count, as the pipeline does.
* decode: ``latents / scaling_factor + shift_factor`` through the VAE.

SD3.5 differs only in the transformer config (``dual_attention_layers``, ``qk_norm``); detection and
sampling are the same. LoRA may target the transformer and both CLIPs; T5 (``text_encoder_3``) is never
adapted (diffusers' ``SD3LoraLoaderMixin`` never loads it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from basemodel.families.base import Conditioning, DenoiserCall, DenoiserInputs, ModelSignals
from basemodel.families.flow import FlowMatchFamily, dynamic_mu, set_flow_timesteps

SEQUENCE = 256  # StableDiffusion3Pipeline's max_sequence_length default


class SD3(FlowMatchFamily):
    name = "sd3"
    label = "SD3/SD3.5"
    pipeline_classes = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    )
    text_encoders = ("text_encoder", "text_encoder_2")
    frozen_text_encoders = {"text_encoder_3": "T5"}
    tokenizers = ("tokenizer", "tokenizer_2")
    default_resolution = 1024
    default_guidance = 7.0
    context_width = 4096  # T5-XXL (the CLIPs' 2048 are padded to it)
    # sd-scripts' SD3 key prefixes come with ``community_lora``
    kohya_prefixes = {}
    checkpoint_markers = ()
    checkpoint_description = "an SD3 checkpoint"
    modelspec = "stable-diffusion-3"
    kohya_version = "sd3"

    def load_kwargs(self, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A folder saved without T5 (``text_encoder_3=None``) loads with it left out, as diffusers
        users load SD3 without T5."""
        if index is None:
            return {}
        present = {name for name, value in index.items() if isinstance(value, list) and value[0] is not None}
        return {name: None for name in ("text_encoder_3", "tokenizer_3") if name not in present}

    def claims(self, signals: ModelSignals) -> bool:
        if signals.pipeline_class is not None:
            return signals.pipeline_class in self.pipeline_classes
        return "caption_projection_dim" in signals.denoiser and "joint_attention_dim" in signals.denoiser

    def problems(self, signals: ModelSignals) -> list[str]:
        found = super().problems(signals)
        for key in ("joint_attention_dim", "caption_projection_dim", "pooled_projection_dim"):
            if key not in signals.denoiser:
                found.append(f"its transformer config has no {key!r}")
        return found

    @staticmethod
    def variant(config: Any) -> str:
        """``sd3.5`` when the transformer has SD3.5's dual-attention layers or QK norm, else ``sd3``."""
        get = (
            config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
        )
        return "sd3.5" if get("dual_attention_layers", ()) or get("qk_norm", None) else "sd3"

    # -- sampling ----------------------------------------------------------------------------------------
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
    ) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` (every encoder gets the same prompt)."""
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=device or pipe.transformer.device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt or None,
            max_sequence_length=SEQUENCE,
        )
        positive = DenoiserInputs(cond, {"pooled_projections": pooled})
        negative = DenoiserInputs(uncond, {"pooled_projections": pooled_uncond}) if guidance else None
        return Conditioning(positive, negative)

    def set_timesteps(
        self,
        pipe: Any,
        scheduler: Any,
        steps: int,
        device: torch.device,
        *,
        latent_shape: tuple[int, ...],
    ) -> None:
        """The static shift of the scheduler config; ``mu`` from the patch count when it shifts
        dynamically (``StableDiffusion3Pipeline``: ``max_shift`` default 1.16)."""
        mu = None
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = int(pipe.transformer.config.patch_size)
            mu = dynamic_mu(scheduler.config, (latent_shape[2] // patch) * (latent_shape[3] // patch), 1.16)
        set_flow_timesteps(scheduler, steps, device, mu=mu)
        self.begin_denoising(scheduler)

    def denoiser_call(self, pipe: Any, inputs: DenoiserInputs, *, height: int, width: int) -> DenoiserCall:
        """``transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections)``."""
        transformer = pipe.transformer
        hidden, pooled = inputs.hidden, inputs.added["pooled_projections"]

        def call(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
            return out

        return call
