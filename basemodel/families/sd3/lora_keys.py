"""SD3 / SD3.5 community LoRA names → ``SD3Transformer2DModel`` modules, built from the transformer config.

kohya sd-scripts (``sd3_train_network.py``, ``networks/lora_sd3.py``) and ComfyUI name the modules of
Stability's MMDiT (SGM layout): kohya writes ``lora_unet_`` + the path with ``_`` for ``.``. diffusers has
no converter for these names and loads such a file with no effect at all (sd-scripts issue 1743); the
table below is diffusers' own single-file mapping (``convert_sd3_transformer_checkpoint_to_diffusers``)
taken from the config: ``inner = num_attention_heads · attention_head_dim``, the last block is
``context_pre_only`` (no context ``proj``/``mlp``, its adaLN continuous), SD3.5's dual attention on the
blocks of ``dual_attention_layers``::

    joint_blocks.{i}.x_block.attn.qkv            transformer_blocks.{i}.attn.to_q | to_k | to_v   (inner each)
    joint_blocks.{i}.x_block.attn.proj           transformer_blocks.{i}.attn.to_out.0
    joint_blocks.{i}.x_block.attn2.qkv           transformer_blocks.{i}.attn2.to_q | to_k | to_v
    joint_blocks.{i}.x_block.attn2.proj          transformer_blocks.{i}.attn2.to_out.0
    joint_blocks.{i}.x_block.mlp.fc1 / fc2       transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    joint_blocks.{i}.x_block.adaLN_modulation.1  transformer_blocks.{i}.norm1.linear
    joint_blocks.{i}.context_block.attn.qkv      transformer_blocks.{i}.attn.add_q_proj | add_k_proj
                                                 | add_v_proj
    joint_blocks.{i}.context_block.attn.proj     transformer_blocks.{i}.attn.to_add_out             (not last)
    joint_blocks.{i}.context_block.mlp.fc1 / fc2 transformer_blocks.{i}.ff_context.net.0.proj / .2  (not last)
    joint_blocks.{i}.context_block.adaLN_modulation.1
                                                 transformer_blocks.{i}.norm1_context.linear
                                                 (last block: shift, scale → scale, shift)
    x_embedder.proj                              pos_embed.proj
    t_embedder.mlp.0 / .2                        time_text_embed.timestep_embedder.linear_1 / linear_2
    y_embedder.mlp.0 / .2                        time_text_embed.text_embedder.linear_1 / linear_2
    context_embedder                             context_embedder
    final_layer.linear                           proj_out
    final_layer.adaLN_modulation.1               norm_out.linear (shift, scale → scale, shift)

Text encoders: CLIP-L ``lora_te1_`` and CLIP-G ``lora_te2_`` (ComfyUI ``text_encoders.clip_l/clip_g.
transformer.``); the T5 (``lora_te3_``, ``text_encoders.t5xxl.``) is never adapted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from basemodel.families.lora_tables import CommunityLayout, Target, rename, split, swap_halves

T5_WHY = (
    "the T5 text encoder is never adapted (it is frozen, and diffusers drops T5 LoRA keys too); re-export "
    "the LoRA without its T5 part (lora_te3_)"
)
MODELSPEC = "stable-diffusion-3"  # sd-scripts' sai_model_spec.ARCH_SD3_M, followed by the model type
MODEL_TYPES = ("medium", "5-large", "5-medium")  # sd-scripts' sd3_utils model types


def inner_width(config: Mapping[str, Any]) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def kohya_table(config: Mapping[str, Any]) -> dict[str, tuple[Target, ...]]:
    """SGM module path → diffusers targets, for every LoRA-targetable module of the model."""
    inner = inner_width(config)
    layers = int(config["num_layers"])
    dual = {int(i) for i in config.get("dual_attention_layers") or ()}
    table: dict[str, tuple[Target, ...]] = {}
    for i in range(layers):
        x, c, dst = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        table[f"{x}.attn.qkv"] = split(
            [f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v"], [inner] * 3
        )
        table[f"{x}.attn.proj"] = rename(f"{dst}.attn.to_out.0")
        table[f"{x}.mlp.fc1"] = rename(f"{dst}.ff.net.0.proj")
        table[f"{x}.mlp.fc2"] = rename(f"{dst}.ff.net.2")
        table[f"{x}.adaLN_modulation.1"] = rename(f"{dst}.norm1.linear")
        if i in dual:
            qkv2 = [f"{dst}.attn2.to_q", f"{dst}.attn2.to_k", f"{dst}.attn2.to_v"]
            table[f"{x}.attn2.qkv"] = split(qkv2, [inner] * 3)
            table[f"{x}.attn2.proj"] = rename(f"{dst}.attn2.to_out.0")
        adds = [f"{dst}.attn.add_q_proj", f"{dst}.attn.add_k_proj", f"{dst}.attn.add_v_proj"]
        table[f"{c}.attn.qkv"] = split(adds, [inner] * 3)
        if i == layers - 1:  # context_pre_only: AdaLayerNormContinuous, no output projection or MLP
            table[f"{c}.adaLN_modulation.1"] = swap_halves(f"{dst}.norm1_context.linear", inner)
            continue
        table[f"{c}.attn.proj"] = rename(f"{dst}.attn.to_add_out")
        table[f"{c}.mlp.fc1"] = rename(f"{dst}.ff_context.net.0.proj")
        table[f"{c}.mlp.fc2"] = rename(f"{dst}.ff_context.net.2")
        table[f"{c}.adaLN_modulation.1"] = rename(f"{dst}.norm1_context.linear")
    table["x_embedder.proj"] = rename("pos_embed.proj")
    for src, dst in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        table[f"{src}.mlp.0"] = rename(f"time_text_embed.{dst}.linear_1")
        table[f"{src}.mlp.2"] = rename(f"time_text_embed.{dst}.linear_2")
    table["context_embedder"] = rename("context_embedder")
    table["final_layer.linear"] = rename("proj_out")
    table["final_layer.adaLN_modulation.1"] = swap_halves("norm_out.linear", inner)
    return table


def layout(config: Mapping[str, Any]) -> CommunityLayout:
    """The SD3 community layout for a transformer with this config."""
    return CommunityLayout(
        component="transformer",
        kohya=kohya_table(config),
        text_prefixes={
            "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2",
            "text_encoders.clip_l.transformer.": "text_encoder",
            "text_encoders.clip_g.transformer.": "text_encoder_2",
        },
        refused={"lora_te3_": T5_WHY, "text_encoders.t5xxl.": T5_WHY},
    )


def model_type(config: Mapping[str, Any]) -> str:
    """sd-scripts' SD3 model type (``sd3_utils``): ``medium`` without QK norm (SD3), else ``5-large``
    without dual attention layers and ``5-medium`` with them (SD3.5)."""
    if not config.get("qk_norm"):
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


def modelspec_architecture(config: Mapping[str, Any]) -> str:
    """``modelspec.architecture`` as sd-scripts writes it: ``stable-diffusion-3-<type>/lora``."""
    return f"{MODELSPEC}-{model_type(config)}/lora"


def kohya_base_version(config: Mapping[str, Any]) -> str:
    """``ss_base_model_version`` as sd-scripts writes it for SD3: the model type."""
    return model_type(config)
