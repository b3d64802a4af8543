"""Flux.1 (dev and schnell): ``FluxPipeline``, an MMDiT transformer on packed latents, CLIP-L + T5.

Everything follows ``FluxPipeline.__call__`` (diffusers 0.42):

* prompts: CLIP-L's pooled output becomes ``pooled_projections``; T5's last hidden states, padded to
  ``max_sequence_length`` (512 on dev, 256 on schnell: diffusers' defaults), ``encoder_hidden_states``;
  ``txt_ids`` are zeros ``[tokens, 3]``.
* guidance: Flux-dev (``guidance_embeds`` in the transformer config) is guidance-distilled — the
  request's ``guidance_scale`` goes into the model as a per-row ``guidance`` input and no classifier-free
  guidance runs; schnell takes none. ``true_cfg_scale`` > 1 with a negative prompt runs real CFG on top
  (an unconditional pass with the negative prompt), as diffusers offers it.
* latents: noise drawn ``[rows, in_channels/4, 2·(h // 16), 2·(w // 16)]`` (VAE factor 8, then 2×2
  patches), packed to ``[rows, (h/16)·(w/16), in_channels]``; ``img_ids`` give each patch its (row, col).
* schedule: FlowMatchEuler with ``sigmas = linspace(1, 1/steps, steps)`` and the dynamic shift ``mu`` from
  the packed sequence length; the transformer takes ``timestep / 1000``.
* decode: unpack, then ``latents / scaling_factor + shift_factor`` through the VAE.

LoRA may target the transformer and CLIP-L (``text_encoder``); T5 (``text_encoder_2``) is never
adapted (diffusers' ``FluxLoraLoaderMixin`` filters T5 keys out; we refuse them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from basemodel.families.flow import FlowMatchFamily, dynamic_mu, set_flow_timesteps
from basemodel.families.flux import lora_keys
from basemodel.families.lora_tables import CommunityLayout
from basemodel.families.values import Conditioning, DenoiserCall, DenoiserInputs, ModelSignals

if TYPE_CHECKING:
    from basemodel.textual_inversion import Embedding

DEV_SEQUENCE = 512  # FluxPipeline's max_sequence_length default (dev)
SCHNELL_SEQUENCE = 256  # what schnell was distilled with (diffusers' docs use it for schnell)
PATCH = 2  # latents are packed in 2×2 patches


class Flux(FlowMatchFamily):
    name = "flux"
    label = "Flux.1"
    pipeline_classes = ("FluxPipeline",)
    text_encoders = ("text_encoder",)
    frozen_text_encoders = {"text_encoder_2": "T5"}
    tokenizers = ("tokenizer",)
    # CLIP-L takes SD1-style files and SDXL files' clip_l; T5 takes none
    embedding_parts = {"single": "text_encoder", "clip_l": "text_encoder"}
    embedding_dropped = frozenset({"clip_g"})
    default_resolution = 1024
    default_guidance = 3.5
    context_width = 4096  # T5-XXL
    # sd-scripts' key prefixes for Flux (community layouts: ``community_lora``)
    kohya_prefixes = {}
    checkpoint_markers = ()
    # diffusers' ``CHECKPOINT_KEY_NAMES`` marker, bare (BFL/SAI) or under ComfyUI's prefix
    checkpoint_keys = (
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
    )
    checkpoint_description = "a Flux.1 checkpoint (double_blocks keys)"
    modelspec = "flux-1-dev"
    kohya_version = "flux1"
    trainable = True
    training_text_keys = ("hidden", "pooled_projections")
    # train_dreambooth_lora_flux.py's default ``lora_layers`` (the single blocks' attention matches too)
    training_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )

    # -- detection -------------------------------------------------------------------------------------
    def modelspec_architecture(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        """``flux-1-dev/lora`` or ``flux-1-schnell/lora`` (sd-scripts' names), from ``guidance_embeds``."""
        return lora_keys.modelspec_architecture(config if config is not None else {"guidance_embeds": True})

    def interop_aliases(self, key: str) -> frozenset[str]:
        if key == "modelspec.architecture":
            return frozenset(lora_keys.MODELSPEC_NAMES)
        return frozenset({lora_keys.KOHYA_VERSION})

    def lora_layout(self, config: Mapping[str, Any]) -> CommunityLayout:
        """kohya sd-scripts / ComfyUI / ai-toolkit / XLabs names (``lora_keys.py``), from the config."""
        return lora_keys.layout(config)

    def claims(self, signals: ModelSignals) -> bool:
        if signals.pipeline_class is not None:
            return signals.pipeline_class in self.pipeline_classes
        return "num_single_layers" in signals.denoiser and "guidance_embeds" in signals.denoiser

    def problems(self, signals: ModelSignals) -> list[str]:
        found = super().problems(signals)
        if signals.components and "text_encoder_2" not in signals.components:
            found.append("it has no text_encoder_2 (T5)")
        for key in ("num_single_layers", "guidance_embeds", "joint_attention_dim"):
            if key not in signals.denoiser:
                found.append(f"its transformer config has no {key!r}")
        return found

    @staticmethod
    def distilled_guidance(pipe: Any) -> bool:
        """Flux-dev: the transformer embeds the guidance scale (``guidance_embeds``); schnell does not."""
        return bool(pipe.transformer.config.guidance_embeds)

    def variant(self, pipe: Any) -> str:
        return "dev" if self.distilled_guidance(pipe) else "schnell"

    def max_sequence_length(self, pipe: Any) -> int:
        return DEV_SEQUENCE if self.distilled_guidance(pipe) else SCHNELL_SEQUENCE

    def native_size(self, pipe: Any) -> int:
        """The VAE's sample size (1024 on Flux.1); the transformer config has none."""
        sample_size = getattr(pipe.vae.config, "sample_size", None)
        return int(sample_size) if sample_size else self.default_resolution

    # -- sampling ----------------------------------------------------------------------------------------
    def cfg_scale(self, guidance_scale: float, true_cfg_scale: float, negative_prompt: str) -> float:
        """True CFG only with ``true_cfg_scale`` > 1 and a negative prompt (``FluxPipeline``'s rule);
        ``guidance_scale`` is the distilled guidance, never CFG."""
        return true_cfg_scale if negative_prompt else 1.0

    def split_guidance(self, cfg_scale: float, distilled_scale: float) -> tuple[float, float]:
        """Forge's split: the distilled value is the embedded ``guidance_scale`` (schnell ignores it), the
        CFG scale is ``true_cfg_scale`` (real CFG, run only with a negative prompt, as above)."""
        return distilled_scale, cfg_scale

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
        """``FluxPipeline.encode_prompt`` for the prompt, and for the negative prompt under true CFG; a
        prompt naming ``embeddings`` gets their vectors on CLIP-L (T5 reads the names as words)."""
        device = device or pipe.transformer.device
        embedded = (
            {"guidance": torch.full([num_images], guidance_scale, device=device, dtype=torch.float32)}
            if self.distilled_guidance(pipe)
            else {}
        )

        def one(text: str) -> DenoiserInputs:
            found = self.embedded_text(pipe, text, embeddings, num_images)
            hidden, pooled, text_ids = pipe.encode_prompt(
                prompt=text,
                device=device,
                num_images_per_prompt=num_images,
                prompt_embeds=found["hidden"] if found else None,
                pooled_prompt_embeds=found["pooled_projections"] if found else None,
                max_sequence_length=self.max_sequence_length(pipe),
            )
            added = {"pooled_projections": pooled, **embedded}
            return DenoiserInputs(hidden, added, {"txt_ids": text_ids})

        return Conditioning(one(prompt), one(negative_prompt) if guidance else None)

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.in_channels) // (PATCH * PATCH)

    def latent_size(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """The unpacked latent (height, width): even, as ``prepare_latents`` rounds them."""
        factor = int(pipe.vae_scale_factor) * PATCH
        return PATCH * (int(height) // factor), PATCH * (int(width) // factor)

    def latent_shape(self, pipe: Any, rows: int, height: int, width: int) -> tuple[int, ...]:
        """Packed: ``[rows, (h/2)·(w/2), 4·channels]`` of the unpacked latent size."""
        h, w = self.latent_size(pipe, height, width)
        return (rows, (h // PATCH) * (w // PATCH), self.latent_channels(pipe) * PATCH * PATCH)

    def noise_latents(
        self,
        pipe: Any,
        rows: int,
        height: int,
        width: int,
        generators: Sequence[torch.Generator],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``FluxPipeline.prepare_latents``: noise on the unpacked shape, then ``_pack_latents``."""
        from diffusers.utils.torch_utils import randn_tensor  # diffusers only when sampling

        h, w = self.latent_size(pipe, height, width)
        channels = self.latent_channels(pipe)
        noise = randn_tensor((rows, channels, h, w), generator=list(generators), device=device, dtype=dtype)
        return pack(noise)

    def set_timesteps(
        self,
        pipe: Any,
        scheduler: Any,
        steps: int,
        device: torch.device,
        *,
        latent_shape: tuple[int, ...],
    ) -> None:
        """``sigmas = linspace(1, 1/steps, steps)`` (none when the scheduler makes flow sigmas itself)
        and ``mu`` from the packed sequence length, as ``FluxPipeline`` calls ``retrieve_timesteps``."""
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = dynamic_mu(scheduler.config, int(latent_shape[1]), max_shift=1.15)
        set_flow_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        self.begin_denoising(scheduler)

    def denoiser_call(self, pipe: Any, inputs: DenoiserInputs, *, height: int, width: int) -> DenoiserCall:
        """``transformer(hidden_states, timestep / 1000, guidance, pooled_projections,
        encoder_hidden_states, txt_ids, img_ids)`` with ``img_ids`` from the image size."""
        transformer = pipe.transformer
        h, w = self.latent_size(pipe, height, width)
        img_ids = image_ids(h // PATCH, w // PATCH, inputs.hidden.device, inputs.hidden.dtype)
        fixed = _call_kwargs(inputs.added, inputs.shared, img_ids)
        hidden = inputs.hidden

        def call(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
            out: torch.Tensor = transformer(
                hidden_states=model_input,
                timestep=timestep / 1000,
                encoder_hidden_states=hidden,
                **fixed,
                return_dict=False,
            )[0]
            return out

        return call

    # -- training ------------------------------------------------------------------------------------
    def sequence_length(self, pipe: Any) -> int:
        return self.max_sequence_length(pipe)

    def context_width_of(self, pipe: Any) -> int | None:
        return int(pipe.text_encoder_2.config.d_model)

    def training_text(
        self,
        pipe: Any,
        tokens: Mapping[str, torch.Tensor],
        frozen: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``FluxPipeline.encode_prompt``: CLIP-L's pooled output and T5's last hidden states."""
        pooled = pipe.text_encoder(tokens["text_encoder"], output_hidden_states=False).pooler_output
        hidden = (frozen or self.frozen_text(pipe, tokens))["t5"]
        return {"hidden": hidden, "pooled_projections": pooled}

    def training_inputs(
        self, text: Mapping[str, torch.Tensor], added: Mapping[str, torch.Tensor]
    ) -> DenoiserInputs:
        """T5's states, CLIP's pooled projection and ``txt_ids`` (zeros, one row per text token)."""
        hidden = text["hidden"]
        txt_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)
        return DenoiserInputs(
            hidden, {"pooled_projections": text["pooled_projections"]}, {"txt_ids": txt_ids}
        )

    def embeds_guidance(self, pipe: Any) -> bool:
        return self.distilled_guidance(pipe)

    def with_guidance(self, pipe: Any, inputs: DenoiserInputs, guidance: float) -> DenoiserInputs:
        """Flux-dev trains with its guidance embedding at ``guidance`` (the script's ``--guidance_scale``)."""
        if not self.distilled_guidance(pipe):
            return inputs
        rows = inputs.hidden.shape[0]
        value = torch.full([rows], guidance, device=inputs.hidden.device, dtype=torch.float32)
        return DenoiserInputs(inputs.hidden, {**inputs.added, "guidance": value}, inputs.shared)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack(latents)

    def unpack(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None, width: int | None
    ) -> torch.Tensor:
        assert height is not None and width is not None, "Flux latents unpack to a known image size"
        return unpack(latents, *self.latent_size(pipe, height, width))


def _call_kwargs(
    added: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor], img_ids: torch.Tensor
) -> dict[str, Any]:
    return {
        "pooled_projections": added["pooled_projections"],
        "guidance": added.get("guidance"),
        "txt_ids": shared["txt_ids"],
        "img_ids": img_ids,
        "joint_attention_kwargs": None,
    }


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``: ``[rows, c, h, w]`` → ``[rows, (h/2)(w/2), 4c]``."""
    rows, channels, height, width = latents.shape
    latents = latents.view(rows, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(rows, (height // PATCH) * (width // PATCH), channels * PATCH * PATCH)


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``FluxPipeline._unpack_latents`` to the unpacked latent ``height`` × ``width``."""
    rows, _, channels = latents.shape
    latents = latents.view(rows, height // PATCH, width // PATCH, channels // (PATCH * PATCH), PATCH, PATCH)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(rows, channels // (PATCH * PATCH), height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids``: (0, row, col) per packed patch, ``[h·w, 3]``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)
