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
from typing import TYPE_CHECKING, Any

import torch

from basemodel.families.flow import FlowMatchFamily, dynamic_mu, set_flow_timesteps
from basemodel.families.lora_tables import CommunityLayout
from basemodel.families.sd3 import lora_keys
from basemodel.families.values import Conditioning, DenoiserCall, DenoiserInputs, ModelSignals

if TYPE_CHECKING:
    from basemodel.textual_inversion import Embedding

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
    embedding_parts = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # A1111's SDXL files
    default_resolution = 1024
    default_guidance = 7.0
    context_width = 4096  # T5-XXL (the CLIPs' 2048 are padded to it)
    # sd-scripts' SD3 key prefixes come with ``community_lora``
    kohya_prefixes = {}
    checkpoint_markers = ()
    # diffusers' ``CHECKPOINT_KEY_NAMES`` marker, bare (BFL/SAI) or under ComfyUI's prefix
    checkpoint_keys = (
        "joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
    )
    checkpoint_description = "an SD3 checkpoint (joint_blocks keys)"
    modelspec = "stable-diffusion-3"
    kohya_version = "sd3"
    trainable = True
    training_text_keys = ("hidden", "pooled_projections")
    # train_dreambooth_lora_sd3.py's default targets (every joint-attention projection)
    training_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    t5_tokenizer = "tokenizer_3"
    training_weighting = "logit_normal"  # train_dreambooth_lora_sd3.py's default

    def modelspec_architecture(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        """``stable-diffusion-3-<type>/lora`` as sd-scripts writes it (``medium``, ``5-large``,
        ``5-medium`` from the transformer config); ``stable-diffusion-3/lora`` without a config."""
        return lora_keys.modelspec_architecture(config) if config is not None else f"{self.modelspec}/lora"

    def kohya_base_version(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        """sd-scripts' ``ss_base_model_version`` for SD3: the model type (``medium``, ``5-large`` …)."""
        return lora_keys.kohya_base_version(config) if config is not None else self.kohya_version

    def interop_aliases(self, key: str) -> frozenset[str]:
        if key == "modelspec.architecture":
            return frozenset(f"{lora_keys.MODELSPEC}-{t}/lora" for t in lora_keys.MODEL_TYPES)
        return frozenset(lora_keys.MODEL_TYPES)

    def lora_layout(self, config: Mapping[str, Any]) -> CommunityLayout:
        """kohya sd-scripts / ComfyUI / ai-toolkit names (``lora_keys.py``), from the transformer config."""
        return lora_keys.layout(config)

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
        embeddings: Mapping[str, Embedding] | None = None,
    ) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` (every encoder gets the same prompt); a prompt
        naming ``embeddings`` gets their vectors on both CLIPs (T5 reads the names as words)."""
        embedded = self.embedded_text(pipe, prompt, embeddings, num_images)
        against = self.embedded_text(pipe, negative_prompt, embeddings, num_images) if guidance else None
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=device or pipe.transformer.device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt or None,
            prompt_embeds=embedded["hidden"] if embedded else None,
            pooled_prompt_embeds=embedded["pooled_projections"] if embedded else None,
            negative_prompt_embeds=against["hidden"] if against else None,
            negative_pooled_prompt_embeds=against["pooled_projections"] if against else None,
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

    # -- training ------------------------------------------------------------------------------------
    def sequence_length(self, pipe: Any) -> int:
        return SEQUENCE

    def context_width_of(self, pipe: Any) -> int | None:
        t5 = getattr(pipe, "text_encoder_3", None)
        return int(t5.config.d_model) if t5 is not None else None

    def training_text(
        self,
        pipe: Any,
        tokens: Mapping[str, torch.Tensor],
        frozen: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate states side by side,
        zero-padded to T5's width, then T5's states (zeros without T5); pooled: both CLIPs' projections."""
        states, pooled = [], []
        for name in self.text_encoders:
            out = getattr(pipe, name)(tokens[name], output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        t5_states = (frozen or self.frozen_text(pipe, tokens))["t5"].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {
            "hidden": torch.cat([clip, t5_states], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }
