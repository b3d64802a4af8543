"""Build real LoRA adapters for tiny-sd with peft, and re-express them in every input layout."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

from adapters.kohya_ldm import kohya_unet_names

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]
RANK, ALPHA = 4, 8.0
CONV_RANK, CONV_ALPHA = 2, 3.0  # rank/alpha pattern for the 3x3 'conv1' LoCon modules


def rank_of(module: str) -> int:
    return CONV_RANK if module.endswith("conv1") else RANK


def alpha_of(module: str) -> float:
    return CONV_ALPHA if module.endswith("conv1") else ALPHA


@dataclass(frozen=True)
class LoraCase:
    """A peft LoRA on tiny-sd: raw peft tensors per component plus reference outputs with it applied."""

    unet: dict[str, torch.Tensor]  # peft keys without prefix, e.g. 'down_blocks.0…to_q.lora_A.weight'
    text_encoder: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    unet_out: torch.Tensor
    text_out: torch.Tensor
    base_unet_out: torch.Tensor

    def modules(self) -> list[str]:
        """Canonical module names this case targets."""
        out = {f"unet.{k.rsplit('.lora_', 1)[0]}" for k in self.unet}
        out |= {f"text_encoder.{k.rsplit('.lora_', 1)[0]}" for k in self.text_encoder}
        return sorted(out)


def _config(targets: list[str]) -> LoraConfig:
    patterns = "conv1" in targets
    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=targets,
        rank_pattern={"conv1": CONV_RANK} if patterns else {},
        alpha_pattern={"conv1": CONV_ALPHA} if patterns else {},
        init_lora_weights=False,  # random A and B, so the adapter changes the output
    )


def fixed_inputs(pipe: object) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "sample": torch.randn(1, 4, 32, 32, generator=gen),
        "timestep": torch.tensor([500]),
        "input_ids": torch.randint(0, 90, (1, 16), generator=gen),
    }


@torch.no_grad()
def run_unet(unet: nn.Module, text_encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = text_encoder(inputs["input_ids"])[0]
    return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=hidden).sample


@torch.no_grad()
def run_text(text_encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return text_encoder(inputs["input_ids"])[0]


def make_case(pipe: object) -> LoraCase:
    """Inject LoRA into private copies of tiny-sd's UNet and text encoder; record outputs."""
    unet = copy.deepcopy(pipe.unet)  # type: ignore[attr-defined]
    text_encoder = copy.deepcopy(pipe.text_encoder)  # type: ignore[attr-defined]
    inputs = fixed_inputs(pipe)
    base_unet_out = run_unet(unet, text_encoder, inputs)
    torch.manual_seed(7)
    inject_adapter_in_model(_config(UNET_TARGETS), unet)
    inject_adapter_in_model(_config(TE_TARGETS), text_encoder)
    return LoraCase(
        unet={k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()},
        text_encoder={k: v.detach().clone() for k, v in get_peft_model_state_dict(text_encoder).items()},
        inputs=inputs,
        unet_out=run_unet(unet, text_encoder, inputs),
        text_out=run_text(text_encoder, inputs),
        base_unet_out=base_unet_out,
    )


# -- layouts ------------------------------------------------------------------------------------


def _items(case: LoraCase) -> list[tuple[str, str, str, torch.Tensor]]:
    """(component, module path, 'A'|'B', tensor) for every peft tensor."""
    out = []
    for component, sd in (("unet", case.unet), ("text_encoder", case.text_encoder)):
        for key, tensor in sd.items():
            path, role = key.rsplit(".lora_", 1)
            out.append((component, path, role[0], tensor))
    return out


def diffusers_layout(case: LoraCase, *, with_alpha: bool = False) -> dict[str, torch.Tensor]:
    """PEFT/diffusers keys (``unet.….lora_A.weight``); alpha only as ``.alpha`` keys if asked."""
    out: dict[str, torch.Tensor] = {}
    for component, path, role, tensor in _items(case):
        out[f"{component}.{path}.lora_{role}.weight"] = tensor
        if with_alpha:
            out[f"{component}.{path}.alpha"] = torch.tensor(alpha_of(path))
    return out


def legacy_layout(case: LoraCase) -> dict[str, torch.Tensor]:
    """Old diffusers keys: UNet ``….lora.down.weight``, text encoder ``….lora_linear_layer.up.weight``."""
    out: dict[str, torch.Tensor] = {}
    for component, path, role, tensor in _items(case):
        direction = "down" if role == "A" else "up"
        middle = "lora" if component == "unet" else "lora_linear_layer"
        te_path = f"text_model.{path}" if component == "text_encoder" else path
        out[f"{component}.{te_path}.{middle}.{direction}.weight"] = tensor
        out[f"{component}.{te_path}.alpha"] = torch.tensor(alpha_of(path))
    return out


def kohya_name(component: str, path: str) -> str:
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.replace(".", "_")


def kohya_layout(case: LoraCase, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys with ``.alpha``, built by hand from the peft tensors."""
    out: dict[str, torch.Tensor] = {}
    for component, path, role, tensor in _items(case):
        name = kohya_name(component, path)
        out[f"{name}.lora_{'down' if role == 'A' else 'up'}.weight"] = tensor.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha_of(path), dtype=dtype)
    return out


def expected_canonical(case: LoraCase) -> dict[str, torch.Tensor]:
    """Canonical tensors computed independently: B scaled by alpha / rank."""
    out: dict[str, torch.Tensor] = {}
    for component, path, role, tensor in _items(case):
        scale = alpha_of(path) / rank_of(path) if role == "B" else 1.0
        out[f"{component}.{path}.lora_{role}.weight"] = tensor * scale
    return out


Layout = Callable[[LoraCase], dict[str, torch.Tensor]]


def ldm_kohya_layout(kohya: dict[str, torch.Tensor], unet_config: Any) -> dict[str, torch.Tensor]:
    """The same kohya file with its UNet names in the LDM/SGM layout (``lora_unet_input_blocks_…``)."""
    to_ldm = {path.replace(".", "_"): ldm for ldm, path in kohya_unet_names(unet_config).items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in kohya.items():
        if key.startswith("lora_unet_"):
            name, role = key.removeprefix("lora_unet_").split(".", 1)
            key = f"lora_unet_{to_ldm[name]}.{role}"
        out[key] = tensor
    return out
