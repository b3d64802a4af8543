"""Flux.1 single-file checkpoints: BFL's ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` (the
transformer alone, bare names: ``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``,
``img_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev only), ``txt_in``, ``final_layer``), the same
under ComfyUI's ``model.diffusion_model.`` prefix, and ComfyUI's all-in-one checkpoints that add CLIP-L
(``text_encoders.clip_l.transformer.``), T5-XXL (``text_encoders.t5xxl.transformer.``) and the VAE
(``vae.``, LDM names).

Detection reads keys, never the file name: diffusers' marker ``double_blocks.0.img_attn.norm.key_norm.scale``
(``Flux.claims_checkpoint``); ``guidance_in`` → dev, none → schnell (their transformer and scheduler
configs differ: ``configs/flux1-dev``, ``configs/flux1-schnell``). Flux.1 Fill/Depth/Canny (384 or 128
input channels), Flux.2 and Chroma share the block names and are refused by name. The transformer is
converted with diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``; the rest of the loading is
``basemodel.single_file_mmdit``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from basemodel.errors import BaseModelError
from basemodel.families.flux.export import transformer_to_bfl
from basemodel.single_file_mmdit import (
    COMFY_PREFIX,
    Encoder,
    TransformerLayout,
    load_transformer_file,
)

# diffusers' converter splits each single block's fused linear1 at Flux.1's width; see ``convert``
DIFFUSERS_WIDTH = 3072
MLP_RATIO = 4
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
ENCODERS = (
    Encoder(
        "text_encoder",
        "CLIP-L text encoder",
        CLIP_PREFIX,
        "clip",
        "flux1-dev/text_encoder",
        "tokenizer",
        "flux1-dev/tokenizer",
    ),
    Encoder(
        "text_encoder_2", "T5-XXL text encoder", T5_PREFIX, "t5", "flux1-dev/text_encoder_2", "tokenizer_2"
    ),
)
# other models with Flux.1's block names (key suffix → what it is); diffusers tells them apart the same way
OTHER_MODELS = {
    "single_stream_modulation.lin.weight": "a Flux.2 checkpoint (single_stream_modulation keys)",
    "distilled_guidance_layer.in_proj.weight": "a Chroma checkpoint (distilled_guidance_layer keys)",
}
CONTROL_CHANNELS = {384: "a Flux.1 Fill (inpainting) checkpoint", 128: "a Flux.1 Depth/Canny checkpoint"}


def variant(header: Mapping[str, tuple[int, ...]]) -> str:
    """``dev`` when the transformer embeds the guidance scale (``guidance_in``), else ``schnell``."""
    return "dev" if any(key.endswith("guidance_in.in_layer.weight") for key in header) else "schnell"


def layout(name: str) -> TransformerLayout:
    """Flux.1-dev's or -schnell's layout: shipped configs and the guidance embedding follow the keys."""
    guidance = name == "dev"
    return TransformerLayout(
        label=f"Flux.1-{name}",
        family="flux",
        pipeline_class=FluxPipeline,
        transformer_class=FluxTransformer2DModel,
        convert=convert,
        transformer_config=f"flux1-{name}/transformer",
        scheduler_config=f"flux1-{name}/scheduler",
        vae_config="flux1-dev/vae",
        encoders=ENCODERS,
        adjust=lambda config: {**config, "guidance_embeds": guidance},
    )


def load(
    path: Path, header: Mapping[str, tuple[int, ...]], torch_dtype: torch.dtype, components: Path | None
) -> Any:
    """A ``FluxPipeline`` from a BFL/ComfyUI single file (components it lacks from ``components``)."""
    refuse_other_models(path, header)
    return load_transformer_file(path, layout(variant(header)), header, torch_dtype, components)


def refuse_other_models(path: Path, header: Mapping[str, tuple[int, ...]]) -> None:
    found = next(
        (words for suffix, words in OTHER_MODELS.items() if any(k.endswith(suffix) for k in header)), None
    )
    img_in = next((shape for key, shape in header.items() if key.endswith("img_in.weight")), None)
    if found is None and img_in is not None and len(img_in) == 2:
        found = CONTROL_CHANNELS.get(img_in[1])
    if found is not None:
        raise BaseModelError(
            f"{path.name} is {found}, not a Flux.1 text-to-image model",
            detail={"path": str(path), "detected": found},
            hint="Pass FLUX.1-dev or FLUX.1-schnell (or a fine-tune of them), as a .safetensors file or a "
            "diffusers folder.",
        )


def convert(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' converter. It splits every single block's fused ``linear1`` (q, k, v, MLP) at Flux.1's
    width 3072, so those tensors are split here at the checkpoint's own width (``img_in``'s outputs) and
    handed to it as empty (meta) placeholders of the shape it expects."""
    width = int(state["img_in.weight"].shape[0])
    fused = {
        key: state.pop(key) for key in list(state) if key.startswith("single_blocks.") and ".linear1." in key
    }
    rows = DIFFUSERS_WIDTH * (3 + MLP_RATIO)
    for key, tensor in fused.items():
        state[key] = torch.empty((rows, *tensor.shape[1:]), device="meta")
    out: dict[str, torch.Tensor] = convert_flux_transformer_checkpoint_to_diffusers(state)
    for key, tensor in fused.items():
        index, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        q, k, v, mlp = torch.split(tensor, [width, width, width, tensor.shape[0] - 3 * width])
        prefix = f"single_transformer_blocks.{index}."
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            out[f"{prefix}{name}.{kind}"] = part
    return out


def to_single_file(pipe: Any, *, all_in_one: bool = True) -> dict[str, torch.Tensor]:
    """A ``FluxPipeline`` → ComfyUI's layout (transformer under ``model.diffusion_model.``; with
    ``all_in_one`` CLIP-L, T5 and the VAE too); ``all_in_one=False`` writes BFL's bare transformer file."""
    from basemodel.single_file_export import text_encoder_to_file, vae_to_ldm

    transformer = transformer_to_bfl(pipe.transformer.state_dict())
    if not all_in_one:
        return {key: tensor.detach().contiguous() for key, tensor in transformer.items()}
    state = {COMFY_PREFIX + key: tensor for key, tensor in transformer.items()}
    state |= text_encoder_to_file(pipe.text_encoder, CLIP_PREFIX, clip=True)
    state |= text_encoder_to_file(pipe.text_encoder_2, T5_PREFIX, clip=False)
    vae = vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    state |= {VAE_PREFIX + key.split(".", 1)[1]: tensor for key, tensor in vae.items()}
    return {key: tensor.detach().contiguous() for key, tensor in state.items()}


__all__ = ["convert", "layout", "load", "to_single_file", "variant"]
