"""diffusers ``SD3Transformer2DModel`` → SAI's MMDiT key layout (``sd3.5_medium.safetensors``): the inverse
of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``, so that a file written here loads back
through ``basemodel.families.sd3.single_file`` to the same weights (tested)::

    pos_embed.pos_embed → pos_embed, pos_embed.proj → x_embedder.proj, context_embedder → context_embedder,
    time_text_embed.timestep_embedder / text_embedder .linear_1/2 → t_embedder / y_embedder .mlp.0/2,
    proj_out → final_layer.linear, norm_out.linear → final_layer.adaLN_modulation.1 (halves swapped back)
    transformer_blocks.N → joint_blocks.N: attn.to_q/k/v → x_block.attn.qkv (one tensor),
        add_q/k/v_proj → context_block.attn.qkv, attn2.to_q/k/v → x_block.attn2.qkv (SD3.5's dual
        attention), norm_q/k → ln_q/ln_k, to_out.0 / to_add_out → x_block / context_block .attn.proj,
        norm1 / norm1_context .linear → x_block / context_block .adaLN_modulation.1 (the last block's
        context modulation swapped),
        ff / ff_context .net.0.proj / net.2 → x_block / context_block .mlp.fc1/fc2
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from basemodel.single_file_export import swap_halves, transformer_to_single_file

UNNAMED = "SD3 transformer weight {} has no SAI single-file name"
TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
}
BLOCK = {
    "attn.norm_q.": "x_block.attn.ln_q.",
    "attn.norm_k.": "x_block.attn.ln_k.",
    "attn.norm_added_q.": "context_block.attn.ln_q.",
    "attn.norm_added_k.": "context_block.attn.ln_k.",
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn2.norm_q.": "x_block.attn2.ln_q.",
    "attn2.norm_k.": "x_block.attn2.ln_k.",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
# diffusers part → (SAI's fused tensor, its place in it)
FUSED = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
}


def transformer_to_sai(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict → SAI's names (no ``model.diffusion_model.`` prefix)."""
    last = int(config["num_layers"]) - 1

    def pre_only(index: int, part: str, tensor: torch.Tensor) -> torch.Tensor:
        # the last block is pre-only: its context AdaLN is the continuous kind, (shift, scale) in SAI's file
        return swap_halves(tensor) if index == last and part == "norm1_context.linear" else tensor

    blocks = {"transformer_blocks": ("joint_blocks", BLOCK, FUSED)}
    return transformer_to_single_file(state, TOP, blocks, UNNAMED, adjust=pre_only)
