"""SD3 / SD3.5 kohya files (``lora_unet_joint_blocks_…``): read exactly, where diffusers reads nothing.

diffusers has no converter for sd-scripts' SD3 LoRAs and loads them with no effect (sd-scripts issue
1743). The truth here is diffusers' own single-file converter for SD3 checkpoints: the LoRA's ΔW, written
at the SGM keys of an otherwise-zero checkpoint and converted with
``convert_sd3_transformer_checkpoint_to_diffusers``, lands on each diffusers weight exactly as the merged
model's would; our canonical ΔW must equal it module by module (splits, the last block's
``context_pre_only`` adaLN and the final layer's swapped halves included).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from adapters.community import normalise_community
from adapters.errors import AdapterInvalid
from basemodel.families.lora_tables import CommunityLayout
from basemodel.families.sd3 import lora_keys
from basemodel.fingerprint import Architecture
from tests.adapters.community_factory import (
    TINY_SD35,
    architecture,
    clip,
    deltas,
    kohya_lora,
    sd3_transformer,
    source_shape,
)

TINY_SD3 = {**TINY_SD35, "dual_attention_layers": (), "qk_norm": None}


@cache
def sd3(variant: str) -> tuple[Architecture, CommunityLayout, Any]:
    config = TINY_SD35 if variant == "sd3.5" else TINY_SD3
    transformer = sd3_transformer(config)
    encoders = {"text_encoder": clip(True), "text_encoder_2": clip(True, seed=1)}
    arch = architecture("sd3", transformer, encoders)
    return arch, lora_keys.layout(arch.unet_config or {}), transformer


def merged_by_diffusers(
    file: dict[str, torch.Tensor], arch: Architecture, layout: CommunityLayout
) -> dict[str, torch.Tensor]:
    """ΔW of every kohya module written into a zero SGM checkpoint, converted by diffusers' single-file
    code: diffusers module → the ΔW it receives."""
    config = arch.unet_config or {}
    inner = lora_keys.inner_width(config)
    ckpt: dict[str, torch.Tensor] = {"pos_embed": torch.zeros(1, 4, inner)}
    for path, targets in layout.kohya.items():
        shape = source_shape(targets, arch)
        ckpt[f"{path}.weight"] = torch.zeros(shape)
        ckpt[f"{path}.bias"] = torch.zeros(shape[0])
    if config.get("qk_norm"):
        head = int(config["attention_head_dim"])
        for path in layout.kohya:
            if path.endswith("qkv"):
                base = path.removesuffix(".qkv")
                ckpt[f"{base}.ln_q.weight"] = torch.zeros(head)
                ckpt[f"{base}.ln_k.weight"] = torch.zeros(head)
    for key in file:
        if key.endswith(".lora_down.weight"):
            name = key.removeprefix("lora_unet_").removesuffix(".lora_down.weight")
            path = next(p for p in layout.kohya if p.replace(".", "_") == name)
            up, down = file[key.replace("lora_down", "lora_up")], file[key]
            scale = float(file[key.replace("lora_down.weight", "alpha")]) / down.shape[0]
            ckpt[f"{path}.weight"] = (up.flatten(1) @ down.flatten(1)).reshape(
                ckpt[f"{path}.weight"].shape
            ) * scale
    converted = convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    return {
        f"transformer.{k.removesuffix('.weight')}": v for k, v in converted.items() if k.endswith(".weight")
    }


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_kohya_sd3_equals_the_merged_checkpoint(variant: str) -> None:
    arch, layout, _ = sd3(variant)
    file = kohya_lora(layout.kohya, arch, list(layout.kohya), alpha=3.0)
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and info.source_format == "kohya"
    ours = deltas(canonical)
    truth = merged_by_diffusers(file, arch, layout)
    assert set(ours) == {m for m, d in truth.items() if d.dim() >= 2 and bool(d.abs().sum() > 0)}
    for module, dw in ours.items():
        assert dw.abs().max() > 0, module  # the effect is there
        torch.testing.assert_close(dw, truth[module].flatten(1), rtol=1e-5, atol=1e-6, msg=module)
    if variant == "sd3.5":
        assert "transformer.transformer_blocks.0.attn2.to_v" in ours


def test_diffusers_reads_no_sd3_kohya_key() -> None:
    """What diffusers does with the same file: ``StableDiffusion3Pipeline.lora_state_dict`` converts
    nothing, and no key names the transformer, so ``load_lora_weights`` has nothing to load."""
    from diffusers import StableDiffusion3Pipeline

    arch, layout, _ = sd3("sd3")
    file = kohya_lora(layout.kohya, arch, ["joint_blocks.0.x_block.attn.qkv"])
    state = StableDiffusion3Pipeline.lora_state_dict(dict(file))
    assert not any(key.startswith("transformer.") for key in state)


def test_text_encoders_and_t5() -> None:
    arch, layout, _ = sd3("sd3.5")
    file = kohya_lora(layout.kohya, arch, ["context_embedder"])
    for prefix, width in (("lora_te1_", 16), ("lora_te2_", 16)):
        file[f"{prefix}text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, width)
        file[f"{prefix}text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(32, 2)
        file[f"{prefix}text_projection.lora_down.weight"] = torch.randn(2, width)
        file[f"{prefix}text_projection.lora_up.weight"] = torch.randn(16, 2)
    _, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None
    assert {m.split(".", 1)[0] for m in info.ranks} == {"transformer", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2.text_projection" in info.ranks  # CLIPTextModelWithProjection has it: applied
    file["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.randn(2, 8)
    with pytest.raises(AdapterInvalid) as err:
        normalise_community(file, arch, layout)
    assert err.value.reason == "unsupported_component" and "T5" in err.value.message


def test_modelspec_names_follow_sd_scripts() -> None:
    assert lora_keys.modelspec_architecture(TINY_SD3) == "stable-diffusion-3-medium/lora"
    assert lora_keys.modelspec_architecture(TINY_SD35) == "stable-diffusion-3-5-medium/lora"
    large = {**TINY_SD35, "dual_attention_layers": ()}
    assert lora_keys.modelspec_architecture(large) == "stable-diffusion-3-5-large/lora"
    assert lora_keys.kohya_base_version(large) == "5-large"


def test_comfyui_names_read_like_kohya() -> None:
    """ComfyUI's ``diffusion_model.`` + SGM dotted names and ``text_encoders.clip_l/clip_g.transformer.``
    CLIP names (``lora_A``/``lora_B``): the same ΔW as the kohya file."""
    arch, layout, _ = sd3("sd3.5")
    names = ["joint_blocks.0.x_block.attn2.qkv", "joint_blocks.2.context_block.adaLN_modulation.1"]
    kohya = kohya_lora(layout.kohya, arch, names, alpha=2.0) | {
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.ones(2, 16),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.ones(16, 2),
    }
    comfy = kohya_lora(layout.kohya, arch, names, alpha=2.0, prefix="diffusion_model.", dotted=True)
    clip_g = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.k_proj"
    comfy |= {f"{clip_g}.lora_A.weight": torch.ones(2, 16), f"{clip_g}.lora_B.weight": torch.ones(16, 2)}
    ours, info = normalise_community(comfy, arch, layout) or ({}, None)
    theirs, _ = normalise_community(kohya, arch, layout) or ({}, None)
    assert info is not None and info.source_format == "ai-toolkit"
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
