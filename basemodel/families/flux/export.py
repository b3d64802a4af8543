"""diffusers ``FluxTransformer2DModel`` → BFL's key layout (``flux1-dev.safetensors``): the inverse of
diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, so that a file written here loads back
through ``basemodel.families.flux.single_file`` to the same weights (tested)::

    time_text_embed.timestep_embedder / text_embedder / guidance_embedder .linear_1/2
                                  → time_in / vector_in / guidance_in .in_layer/out_layer
    context_embedder → txt_in, x_embedder → img_in, proj_out → final_layer.linear,
    norm_out.linear → final_layer.adaLN_modulation.1 (shift and scale swapped back)
    transformer_blocks.N  → double_blocks.N: norm1(_context).linear → img_mod/txt_mod.lin,
        attn.to_q/k/v → img_attn.qkv (one tensor), add_q/k/v_proj → txt_attn.qkv,
        norm_q/k → img_attn.norm.query_norm/key_norm.scale, norm_added_q/k → txt_attn.norm.…,
        to_out.0 → img_attn.proj, to_add_out → txt_attn.proj, ff(_context).net.0.proj/2 → img/txt_mlp.0/2
    single_transformer_blocks.N → single_blocks.N: norm.linear → modulation.lin, attn.to_q/k/v and
        proj_mlp → linear1 (one tensor), norm_q/k → norm.query_norm/key_norm.scale, proj_out → linear2
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from basemodel.single_file_export import transformer_to_single_file

UNNAMED = "Flux transformer weight {} has no BFL single-file name"
TOP = {
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.",
    "x_embedder.": "img_in.",
    "proj_out.": "final_layer.linear.",
}
DOUBLE = {
    "norm1.linear.": "img_mod.lin.",
    "norm1_context.linear.": "txt_mod.lin.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.": "img_attn.proj.",
    "attn.to_add_out.": "txt_attn.proj.",
    "ff.net.0.proj.": "img_mlp.0.",
    "ff.net.2.": "img_mlp.2.",
    "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.",
}
SINGLE = {
    "norm.linear.": "modulation.lin.",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out.": "linear2.",
}
# fused tensors: diffusers part → (BFL tensor, its place in it), per block kind
DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
SINGLE_FUSED = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
}
BLOCKS = {
    "transformer_blocks": ("double_blocks", DOUBLE, DOUBLE_FUSED),
    "single_transformer_blocks": ("single_blocks", SINGLE, SINGLE_FUSED),
}


def transformer_to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer state dict → BFL's names (no ``model.diffusion_model.`` prefix)."""
    return transformer_to_single_file(state, TOP, BLOCKS, UNNAMED)
