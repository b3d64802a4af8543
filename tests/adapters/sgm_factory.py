"""UNet configs (SD1.5 and SDXL base, small SD1.5 shapes), tiny-sdxl-random's components, kohya files
in LDM/SGM names.

tiny-sdxl-random (``basemodel.families.sdxl.tiny``, built in memory) is the SDXL base of the adapter tests: an
SDXL-layout UNet (``text_time`` embedding, no attention in the first down block, transformer depth 2
in the last) and two CLIP text encoders of different widths, the second with a projection. The real
SDXL base and SD1.5 UNets are built on the meta device (shapes only) for the table tests.
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

from adapters.kohya_ldm import kohya_unet_names
from basemodel.families import get_family
from basemodel.families.sdxl.tiny import build_tiny_sdxl_pipeline
from basemodel.fingerprint import Architecture, describe_modules, public_config
from basemodel.single_file import SD15_CONFIG_DIR, SDXL_CONFIG_DIR

TINY_SD_CONFIG_PATH = SD15_CONFIG_DIR.parents[1] / "weights" / "tiny-sd" / "unet" / "config.json"


def _json(path: Any) -> dict[str, Any]:
    return public_config(json.loads(path.read_text()))


SD15 = _json(SD15_CONFIG_DIR / "unet" / "config.json")
SDXL_BASE = _json(SDXL_CONFIG_DIR / "unet" / "config.json")  # stable-diffusion-xl-base-1.0's, shipped
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
    "sdxl": SDXL_BASE,
}
FULL_SIZE = {"sd15", "sdxl"}  # built on the meta device: shapes, no weights
TINY_SDXL = "tiny-sdxl-random"
UNETS = sorted([*CONFIGS, TINY_SDXL])  # every UNet the table tests cover


@cache
def unet_for(name: str) -> UNet2DConditionModel:
    """A UNet built from ``CONFIGS[name]`` (seeded; real-size ones on the meta device), or
    tiny-sdxl-random's. Do not mutate."""
    if name == TINY_SDXL:
        return tiny_sdxl().unet
    torch.manual_seed(0)
    if name in FULL_SIZE:
        with torch.device("meta"):
            return UNet2DConditionModel(**CONFIGS[name])
    return UNet2DConditionModel(**CONFIGS[name]).eval()


def unet_modules(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("unet."): v for k, v in describe_modules("unet", unet).items()}


@dataclass(frozen=True)
class TinySdxl:
    """tiny-sdxl-random's LoRA components (built in memory from the default seed) and its descriptor."""

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


@cache
def tiny_sdxl() -> TinySdxl:
    pipe = build_tiny_sdxl_pipeline()
    return TinySdxl(
        pipe.unet.eval(),
        pipe.text_encoder.eval(),
        pipe.text_encoder_2.eval(),
        get_family("sdxl").architecture(pipe),
    )


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
