"""Flux.1 community LoRA names → ``FluxTransformer2DModel`` modules, built from the transformer config.

kohya sd-scripts, ComfyUI and ai-toolkit name the modules of Black Forest Labs' original model (kohya
with ``lora_unet_`` and ``_`` for ``.``); XLabs names its attention processors. Widths come from the
config: ``inner = num_attention_heads · attention_head_dim``, the single blocks' MLP input
``int(inner · 4.0)`` (``FluxSingleTransformerBlock``'s ``mlp_ratio``, which the config does not change)::

    double_blocks.{i}.img_attn.qkv        transformer_blocks.{i}.attn.to_q | to_k | to_v   (inner each)
    double_blocks.{i}.img_attn.proj       transformer_blocks.{i}.attn.to_out.0
    double_blocks.{i}.img_mlp.0 / .2      transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    double_blocks.{i}.img_mod.lin         transformer_blocks.{i}.norm1.linear
    double_blocks.{i}.txt_attn.qkv        transformer_blocks.{i}.attn.add_q_proj | add_k_proj | add_v_proj
    double_blocks.{i}.txt_attn.proj       transformer_blocks.{i}.attn.to_add_out
    double_blocks.{i}.txt_mlp.0 / .2      transformer_blocks.{i}.ff_context.net.0.proj / ff_context.net.2
    double_blocks.{i}.txt_mod.lin         transformer_blocks.{i}.norm1_context.linear
    single_blocks.{j}.linear1             single_transformer_blocks.{j}.attn.to_q | to_k | to_v | proj_mlp
    single_blocks.{j}.linear2             single_transformer_blocks.{j}.proj_out
    single_blocks.{j}.modulation.lin      single_transformer_blocks.{j}.norm.linear
    img_in / txt_in                       x_embedder / context_embedder
    time_in.in_layer / .out_layer         time_text_embed.timestep_embedder.linear_1 / linear_2
    vector_in.in_layer / .out_layer       time_text_embed.text_embedder.linear_1 / linear_2
    guidance_in.in_layer / .out_layer     time_text_embed.guidance_embedder.linear_1 / linear_2 (dev)
    final_layer.linear                    proj_out
    final_layer.adaLN_modulation.1        norm_out.linear (shift, scale → scale, shift)

    XLabs: double_blocks.{i}.processor.qkv_lora1 / proj_lora1 (image stream), qkv_lora2 / proj_lora2
    (text stream), single_blocks.{j}.processor.qkv_lora (q, k, v of linear1) / proj_lora (linear2).

Text encoder: CLIP-L as ``lora_te1_`` (or ``lora_te_``) / ComfyUI ``text_encoders.clip_l.transformer.``;
the T5 (``lora_te3_``; ``lora_te2_`` in older sd-scripts files; ``text_encoders.t5xxl.``) is never adapted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from basemodel.families.lora_tables import CommunityLayout, Table, Target, rename, split, swap_halves

MLP_RATIO = 4.0  # FluxSingleTransformerBlock's default; FluxTransformer2DModel never passes another
T5_WHY = (
    "the T5 text encoder is never adapted (it is frozen, as in diffusers, which filters T5 LoRA keys out "
    "too); re-export the LoRA without its T5 part"
)
TE2_WHY = (
    "Flux has one CLIP text encoder (lora_te1_); lora_te2_ names the T5 in older sd-scripts files, which "
    "is never adapted, or a second CLIP of another family (SDXL, SD3)"
)
MODELSPEC_DEV = "flux-1-dev"
MODELSPEC_SCHNELL = "flux-1-schnell"
KOHYA_VERSION = "flux1"  # sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1
# every modelspec.architecture sd-scripts writes for a Flux.1 LoRA (``flux-1`` when it cannot tell)
MODELSPEC_NAMES = (f"{MODELSPEC_DEV}/lora", f"{MODELSPEC_SCHNELL}/lora", "flux-1/lora")


def widths(config: Mapping[str, Any]) -> tuple[int, int]:
    """(inner width, single-block MLP width) of a ``FluxTransformer2DModel`` config."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return inner, int(inner * MLP_RATIO)


def kohya_table(config: Mapping[str, Any]) -> dict[str, tuple[Target, ...]]:
    """BFL module path → diffusers targets, for every LoRA-targetable module of the model."""
    inner, mlp = widths(config)
    table: dict[str, tuple[Target, ...]] = {}
    for i in range(int(config["num_layers"])):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, ff, norm, out, qkv in (
            ("img", "ff", "norm1", "to_out.0", ("to_q", "to_k", "to_v")),
            ("txt", "ff_context", "norm1_context", "to_add_out", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            table[f"{src}.{stream}_attn.qkv"] = split([f"{dst}.attn.{p}" for p in qkv], [inner] * 3)
            table[f"{src}.{stream}_attn.proj"] = rename(f"{dst}.attn.{out}")
            table[f"{src}.{stream}_mlp.0"] = rename(f"{dst}.{ff}.net.0.proj")
            table[f"{src}.{stream}_mlp.2"] = rename(f"{dst}.{ff}.net.2")
            table[f"{src}.{stream}_mod.lin"] = rename(f"{dst}.{norm}.linear")
    for j in range(int(config["num_single_layers"])):
        src, dst = f"single_blocks.{j}", f"single_transformer_blocks.{j}"
        parts = [f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v", f"{dst}.proj_mlp"]
        table[f"{src}.linear1"] = split(parts, [inner, inner, inner, mlp])
        table[f"{src}.linear2"] = rename(f"{dst}.proj_out")
        table[f"{src}.modulation.lin"] = rename(f"{dst}.norm.linear")
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if config.get("guidance_embeds"):
        embedders["guidance_in"] = "guidance_embedder"
    for src, dst in embedders.items():
        table[f"{src}.in_layer"] = rename(f"time_text_embed.{dst}.linear_1")
        table[f"{src}.out_layer"] = rename(f"time_text_embed.{dst}.linear_2")
    table["img_in"] = rename("x_embedder")
    table["txt_in"] = rename("context_embedder")
    table["final_layer.linear"] = rename("proj_out")
    table["final_layer.adaLN_modulation.1"] = swap_halves("norm_out.linear", inner)
    return table


def xlabs_table(config: Mapping[str, Any]) -> Table:
    """XLabs processor LoRA name → diffusers targets (``_convert_xlabs_flux_lora_to_diffusers``)."""
    inner, _ = widths(config)
    table: dict[str, tuple[Target, ...]] = {}
    for i in range(int(config["num_layers"])):
        src, dst = f"double_blocks.{i}.processor", f"transformer_blocks.{i}.attn"
        table[f"{src}.qkv_lora1"] = split([f"{dst}.to_q", f"{dst}.to_k", f"{dst}.to_v"], [inner] * 3)
        table[f"{src}.proj_lora1"] = rename(f"{dst}.to_out.0")
        adds = [f"{dst}.add_q_proj", f"{dst}.add_k_proj", f"{dst}.add_v_proj"]
        table[f"{src}.qkv_lora2"] = split(adds, [inner] * 3)
        table[f"{src}.proj_lora2"] = rename(f"{dst}.to_add_out")
    for j in range(int(config["num_single_layers"])):
        src, dst = f"single_blocks.{j}.processor", f"single_transformer_blocks.{j}"
        qkv = [f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v"]
        table[f"{src}.qkv_lora"] = split(qkv, [inner] * 3)
        table[f"{src}.proj_lora"] = rename(f"{dst}.proj_out")
    return table


def layout(config: Mapping[str, Any]) -> CommunityLayout:
    """The Flux community layout for a transformer with this config."""
    return CommunityLayout(
        component="transformer",
        kohya=kohya_table(config),
        xlabs=xlabs_table(config),
        text_prefixes={
            "lora_te1_": "text_encoder",
            "lora_te_": "text_encoder",
            "text_encoders.clip_l.transformer.": "text_encoder",
        },
        refused={"lora_te2_": TE2_WHY, "lora_te3_": T5_WHY, "text_encoders.t5xxl.": T5_WHY},
    )


def modelspec_architecture(config: Mapping[str, Any]) -> str:
    """sd-scripts' ``modelspec.architecture`` for a LoRA: dev (guidance embedding) or schnell."""
    return f"{MODELSPEC_DEV if config.get('guidance_embeds') else MODELSPEC_SCHNELL}/lora"
