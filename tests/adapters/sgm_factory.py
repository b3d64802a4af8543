"""UNet configs (SD1.5, SDXL, tiny shapes of both), a tiny SDXL-shaped base, kohya files in LDM names.

The SDXL-shaped base stands in for ``tiny-sdxl-random`` in the adapter tests: an SDXL-layout UNet
(``text_time`` embedding, no attention in the first down block, transformer depth > 1) and two small
CLIP text encoders, the second with a projection, as ``StableDiffusionXLPipeline`` has them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from adapters.kohya_ldm import kohya_unet_names
from basemodel.fingerprint import Architecture, describe_modules, public_config
from basemodel.single_file import SD15_CONFIG_DIR

TINY_SD_CONFIG_PATH = SD15_CONFIG_DIR.parents[1] / "weights" / "tiny-sd" / "unet" / "config.json"

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from the defaults).
SDXL_BASE = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
TE_HIDDEN, TE2_PROJECTION, TIME_DIM = 32, 32, 8
SDXL_SHAPED = {
    **SDXL_BASE,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64],
    "transformer_layers_per_block": [1, 2, 3],
    "attention_head_dim": [2, 4, 8],
    "norm_num_groups": 8,
    "cross_attention_dim": 2 * TE_HIDDEN,  # both encoders' hidden states, concatenated
    "addition_time_embed_dim": TIME_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_DIM + TE2_PROJECTION,
}


def _json(path: Any) -> dict[str, Any]:
    return public_config(json.loads(path.read_text()))


SD15 = _json(SD15_CONFIG_DIR / "unet" / "config.json")
SD15_SHAPED = {
    **SD15,
    "sample_size": 8,
    "block_out_channels": [32, 32, 64, 64],
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-sd": _json(TINY_SD_CONFIG_PATH),
    "sd15-shaped": SD15_SHAPED,
    "sd15": SD15,
    "sdxl-shaped": SDXL_SHAPED,
    "sdxl": SDXL_BASE,
}
FULL_SIZE = {"sd15", "sdxl"}  # built on the meta device: shapes, no weights


@cache
def unet_for(name: str) -> UNet2DConditionModel:
    """A UNet built from ``CONFIGS[name]`` (seeded; real-size ones on the meta device). Do not mutate."""
    torch.manual_seed(0)
    if name in FULL_SIZE:
        with torch.device("meta"):
            return UNet2DConditionModel(**CONFIGS[name])
    return UNet2DConditionModel(**CONFIGS[name]).eval()


def unet_modules(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("unet."): v for k, v in describe_modules("unet", unet).items()}


def _clip(with_projection: bool) -> nn.Module:
    config = CLIPTextConfig(
        hidden_size=TE_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=TE2_PROJECTION,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


@dataclass(frozen=True)
class SdxlShaped:
    """A tiny SDXL-shaped base: UNet, two text encoders and their architecture descriptor."""

    unet: UNet2DConditionModel
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    architecture: Architecture

    def kohya(
        self, text_targets: Callable[[str], bool]
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
        """An sd-scripts-style SDXL file: SGM UNet names, ``lora_te1_``/``lora_te2_`` (``random_kohya``)."""
        return random_kohya(self.architecture, self.unet.config, text_targets, te1_prefix="lora_te1_")

    def models(self) -> dict[str, nn.Module]:
        """Private copies of the three models, keyed by component."""
        return {
            "unet": copy.deepcopy(self.unet),
            "text_encoder": copy.deepcopy(self.text_encoder),
            "text_encoder_2": copy.deepcopy(self.text_encoder_2),
        }


def sdxl_shaped() -> SdxlShaped:
    unet = unet_for("sdxl-shaped")
    torch.manual_seed(1)
    text_encoder, text_encoder_2 = _clip(False), _clip(True)
    modules = (
        describe_modules("unet", unet)
        | describe_modules("text_encoder", text_encoder)
        | describe_modules("text_encoder_2", text_encoder_2)
    )
    architecture = Architecture(modules=modules, family="sdxl", unet_config=public_config(unet.config))
    return SdxlShaped(unet, text_encoder, text_encoder_2, architecture)


# -- kohya files ---------------------------------------------------------------------------------

KOHYA_TE = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# sd-scripts' convention: one (rank, alpha) for linear modules, another for convs (conv_dim/conv_alpha).
# Keep it: diffusers 0.42 files the alphas of kohya UNet attention keys under names nothing matches, so
# it applies them correctly only when they equal the file's most common alpha.
LINEAR_RANK, LINEAR_ALPHA, CONV_RANK, CONV_ALPHA = 2, 4.0, 1, 3.0


def random_kohya(
    architecture: Architecture,
    unet_config: Any,
    text_targets: Callable[[str], bool],
    *,
    te1_prefix: str = "lora_te_",
    seed: int = 3,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """A kohya LoRA on every UNet module (LDM names) and the text-encoder modules ``text_targets`` picks.

    Returns (kohya tensors, canonical module → (down, up, alpha)).
    """
    gen = torch.Generator().manual_seed(seed)
    names = {f"unet.{path}": f"lora_unet_{name}" for name, path in kohya_unet_names(unet_config).items()}
    prefixes = {**KOHYA_TE, "text_encoder": te1_prefix}
    for module in architecture.modules:
        component, path = module.split(".", 1)
        if component in prefixes and text_targets(path):
            names[module] = prefixes[component] + path.replace(".", "_")
    kohya: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, name in sorted(names.items()):
        shape = architecture.modules[module]
        conv = len(shape) == 4
        rank, alpha = (CONV_RANK, CONV_ALPHA) if conv else (LINEAR_RANK, LINEAR_ALPHA)
        down = 0.2 * torch.randn(rank, *shape[1:], generator=gen)
        up = 0.2 * torch.randn(shape[0], rank, *((1, 1) if conv else ()), generator=gen)
        kohya |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
        parts[module] = (down, up, alpha)
    return kohya, parts


def expected_canonical(parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module, (down, up, alpha) in parts.items():
        out[f"{module}.lora_A.weight"] = down
        out[f"{module}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


@torch.no_grad()
def merge(models: dict[str, nn.Module], canonical: dict[str, torch.Tensor]) -> None:
    """Apply canonical tensors by their definition: W += lora_B @ lora_A (conv: per kernel position)."""
    for key, down in canonical.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = canonical[f"{module}.lora_B.weight"]
        component, path = module.split(".", 1)
        weight = models[component].get_submodule(path).weight
        delta = up.flatten(1) @ down.flatten(1)
        weight += delta.reshape(weight.shape)
