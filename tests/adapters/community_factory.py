"""Synthetic community LoRA files for the transformer families (Flux.1, SD3), built from the tables' own
source names and the base model's shapes, and the architectures they are checked against."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from basemodel.families.lora_tables import Target
from basemodel.fingerprint import Architecture, describe_modules, public_config

# Flux.1-dev's transformer (diffusers' default config): 19 double and 38 single blocks, width 3072.
FLUX_DEV: dict[str, Any] = {"guidance_embeds": True}
TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [2, 2, 4],
}
TINY_SD35: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "caption_projection_dim": 16,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "out_channels": 16,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def clip(projection: bool = False, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=100, projection_dim=16, **CLIP)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def flux_transformer(config: Mapping[str, Any], *, meta: bool = False) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return FluxTransformer2DModel(**config)
    return FluxTransformer2DModel(**config).eval()


def sd3_transformer(config: Mapping[str, Any]) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**config).eval()


def architecture(family: str, transformer: Any, encoders: Mapping[str, Any]) -> Architecture:
    modules = describe_modules("transformer", transformer)
    for name, encoder in encoders.items():
        modules |= describe_modules(name, encoder)
    return Architecture(modules=modules, family=family, unet_config=public_config(transformer.config))


def source_shape(
    targets: tuple[Target, ...], arch: Architecture, component: str = "transformer"
) -> tuple[int, ...]:
    """The weight shape of the original (fused) module the targets were split from."""
    shapes = [arch.modules[f"{component}.{t.module}"] for t in targets]
    out = max(end for t in targets for _, end in t.rows) if targets[0].rows else shapes[0][0]
    return (out, *shapes[0][1:])


def kohya_lora(
    table: Mapping[str, tuple[Target, ...]],
    arch: Architecture,
    names: Iterable[str],
    *,
    rank: int = 2,
    alpha: float | None = 3.0,
    prefix: str = "lora_unet_",
    dotted: bool = False,
    roles: tuple[str, str] = ("lora_down.weight", "lora_up.weight"),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random LoRA on the table's source ``names`` (kohya underscore names, or dotted after ``prefix``)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        shape = source_shape(table[name], arch)
        key = prefix + (name if dotted else name.replace(".", "_"))
        flat = 1
        for d in shape[1:]:
            flat *= d
        down = torch.randn(rank, *shape[1:], generator=gen) / flat**0.5
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=gen)
        out[f"{key}.{roles[0]}"] = down
        out[f"{key}.{roles[1]}"] = up
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b.flatten(1) @ a.flatten(1)


def deltas(canonical: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """module → ΔW = B·A of canonical (or diffusers-layout) LoRA tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, down in canonical.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[prefix + module] = delta(down.float(), canonical[module + ".lora_B.weight"].float())
    return out


def probes(canonical: Mapping[str, torch.Tensor], prefix: str = "", seed: int = 1) -> dict[str, torch.Tensor]:
    """module → ΔW·P = B·(A·P) for a fixed random P: equal ΔWs give equal probes, and nothing of full
    Flux width is multiplied out."""
    out: dict[str, torch.Tensor] = {}
    for key, down in canonical.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            gen = torch.Generator().manual_seed(seed)
            p = torch.randn(down.flatten(1).shape[1], 4, generator=gen)
            out[prefix + module] = canonical[module + ".lora_B.weight"].float().flatten(1) @ (
                down.float().flatten(1) @ p
            )
    return out
