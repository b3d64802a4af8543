"""SD3 / SD3.5 single-file checkpoints as Stability AI ships them (``sd3.5_medium.safetensors``,
``sd3.5_large.safetensors``, ``sd3_medium.safetensors`` / ``…_incl_clips[_t5xxlfp16].safetensors``): the
MMDiT under ``model.diffusion_model.`` (``joint_blocks.N.x_block.…``, ``context_block.…``, ``pos_embed``,
``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``, ``final_layer``; bare names too), the
VAE under ``first_stage_model.`` (LDM names) and optionally CLIP-L, CLIP-G and T5-XXL under
``text_encoders.clip_l/clip_g/t5xxl.transformer.`` (transformers' names).

Detection reads keys, never the file name: diffusers' marker
``joint_blocks.0.context_block.adaLN_modulation.1.bias`` (``SD3.claims_checkpoint``); SD3.5 medium has
dual-attention blocks (``x_block.attn2``), SD3.5 large QK norm (``ln_q``) without them, SD3 medium
neither: each has its shipped transformer config (``configs/sd35-medium``, ``sd35-large``,
``sd3-medium``). The VAE, scheduler and text encoders are the same in all three; CLIP-L's pooled output
is used unprojected (the identity projection, as diffusers' converter sets it). A file without T5
loads without it (``text_encoder_3=None``, as SAI's ``sd3_medium_incl_clips`` is meant to run and as
diffusers allows) unless ``--base-components`` supplies one. The transformer is converted with
diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``; the rest is
``basemodel.single_file_mmdit``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from basemodel.families.sd3.export import transformer_to_sai
from basemodel.single_file_mmdit import COMFY_PREFIX, Encoder, TransformerLayout, load_transformer_file

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "first_stage_model."
ENCODERS = (
    Encoder(
        "text_encoder",
        "CLIP-L text encoder",
        CLIP_L_PREFIX,
        "clip_identity",
        "sd35-medium/text_encoder",
        "tokenizer",
        "sd35-medium/tokenizer",
    ),
    Encoder(
        "text_encoder_2",
        "CLIP-G text encoder",
        CLIP_G_PREFIX,
        "clip_projection",
        "sd35-medium/text_encoder_2",
        "tokenizer_2",
        "sd35-medium/tokenizer_2",
    ),
    Encoder(
        "text_encoder_3", "T5-XXL text encoder", T5_PREFIX, "t5", "flux1-dev/text_encoder_2", "tokenizer_3"
    ),
)
VARIANTS = {  # name → (label, shipped transformer config)
    "sd3.5-medium": ("SD3.5 medium", "sd35-medium/transformer"),
    "sd3.5-large": ("SD3.5 large", "sd35-large/transformer"),
    "sd3-medium": ("SD3 medium", "sd3-medium/transformer"),
}


def variant(header: Mapping[str, tuple[int, ...]]) -> str:
    """``sd3.5-medium`` (dual attention), ``sd3.5-large`` (QK norm only) or ``sd3-medium`` (neither)."""
    blocks = [key for key in header if ".joint_blocks." in f".{key}"]
    if any(".x_block.attn2." in key for key in blocks):
        return "sd3.5-medium"
    if any(".attn.ln_q." in key for key in blocks):
        return "sd3.5-large"
    return "sd3-medium"


def layout(name: str) -> TransformerLayout:
    label, transformer_config = VARIANTS[name]
    return TransformerLayout(
        label=label,
        family="sd3",
        pipeline_class=StableDiffusion3Pipeline,
        transformer_class=SD3Transformer2DModel,
        convert=convert,
        transformer_config=transformer_config,
        scheduler_config="sd35-medium/scheduler",
        vae_config="sd35-medium/vae",
        encoders=ENCODERS,
        optional=frozenset({"text_encoder_3", "tokenizer_3"}),
    )


def load(
    path: Path, header: Mapping[str, tuple[int, ...]], torch_dtype: torch.dtype, components: Path | None
) -> Any:
    """A ``StableDiffusion3Pipeline`` from an SAI single file (components it lacks from ``components``)."""
    return load_transformer_file(path, layout(variant(header)), header, torch_dtype, components)


def convert(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' converter (it reads depth, dual-attention blocks and QK norm from the keys)."""
    out: dict[str, torch.Tensor] = convert_sd3_transformer_checkpoint_to_diffusers(state)
    return out


def to_single_file(pipe: Any, *, all_in_one: bool = True) -> dict[str, torch.Tensor]:
    """A ``StableDiffusion3Pipeline`` → SAI's layout: the MMDiT under ``model.diffusion_model.`` and the
    VAE under ``first_stage_model.``; with ``all_in_one`` the text encoders it has too."""
    from basemodel.single_file_export import text_encoder_to_file, vae_to_ldm

    transformer = transformer_to_sai(pipe.transformer.state_dict(), pipe.transformer.config)
    state = {COMFY_PREFIX + key: tensor for key, tensor in transformer.items()}
    state |= vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    if all_in_one:
        for encoder in ENCODERS:
            model = getattr(pipe, encoder.name, None)
            if model is None:
                continue
            weights = text_encoder_to_file(model, encoder.prefix, clip=encoder.kind != "t5")
            if encoder.kind == "clip_identity":  # SAI's files carry no CLIP-L projection
                weights.pop(f"{encoder.prefix}text_projection.weight", None)
            state |= weights
    return {key: tensor.detach().contiguous() for key, tensor in state.items()}


__all__ = ["VAE_PREFIX", "convert", "layout", "load", "to_single_file", "variant"]
