"""LoRA injection (peft), the frozen-base guarantee and the adapter's tensors.

Insertion points are peft ``target_modules`` names matched as module-path suffixes: the default
``to_q, to_k, to_v, to_out.0`` adapts every attention projection of the UNet (self- and
cross-attention); ``ff.net.0.proj``/``ff.net.2`` add the feed-forward layers, ``proj_in``/``proj_out``
the transformer in/out projections, ``conv1``/``conv2``/``conv_shortcut`` the ResNet convolutions.
Every name must match at least one ``nn.Linear``/``nn.Conv2d`` of the model, otherwise it is a
config error listing the names that exist. ``--train-text-encoder`` adapts every text encoder of the
family (SDXL: ``text_encoder`` and ``text_encoder_2``) with ``--text-encoder-target-modules``.

Functions taking ``text_encoders`` accept one module (SD1.x's ``text_encoder``) or a mapping of
component name → text encoder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from training.config import TrainConfig
from training.errors import TrainConfigError

ADAPTER_NAME = "default"
_TARGETABLE = (nn.Linear, nn.Conv2d)


TextEncoders = nn.Module | Mapping[str, nn.Module]


def text_encoder_map(text_encoders: TextEncoders) -> dict[str, nn.Module]:
    """Component name → text encoder (one module is ``text_encoder``)."""
    if isinstance(text_encoders, nn.Module):
        return {"text_encoder": text_encoders}
    return dict(text_encoders)


@dataclass
class Injection:
    """What was adapted (component → module paths, the denoiser first: ``unet`` or ``transformer``)
    and which parameters train."""

    module_paths: dict[str, list[str]]
    params: dict[str, list[nn.Parameter]] = field(repr=False)
    lora_config: dict[str, Any] = field(default_factory=dict)
    denoiser: str = "unet"

    @property
    def unet_modules(self) -> list[str]:
        """Adapted module paths of the denoiser (the UNet, or SD3's/Flux's transformer)."""
        return self.module_paths[self.denoiser]

    @property
    def text_encoder_modules(self) -> list[str]:
        """Adapted module paths of every text encoder."""
        return [m for name, paths in self.module_paths.items() if name != self.denoiser for m in paths]

    @property
    def unet_params(self) -> list[nn.Parameter]:
        return self.params[self.denoiser]

    @property
    def text_encoder_params(self) -> list[nn.Parameter]:
        return [p for name, params in self.params.items() if name != self.denoiser for p in params]

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.unet_params + self.text_encoder_params)

    @property
    def module_counts(self) -> dict[str, int]:
        return {name: len(paths) for name, paths in self.module_paths.items()}

    @property
    def modules(self) -> list[str]:
        return [f"{name}.{m}" for name, paths in self.module_paths.items() for m in paths]


def matching_modules(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """target name → full paths of the ``Linear``/``Conv2d`` modules it selects (peft suffix rule)."""
    found: dict[str, list[str]] = {t: [] for t in targets}
    for name, module in model.named_modules():
        if not isinstance(module, _TARGETABLE) or "lora_" in name or name.endswith("base_layer"):
            continue
        for target in targets:
            if name == target or name.endswith("." + target):
                found[target].append(name)
    return found


def _suffixes(model: nn.Module) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, _TARGETABLE):
            parts = name.split(".")
            tail = parts[-2:] if parts[-1].isdigit() else parts[-1:]
            names.add(".".join(tail))
    return sorted(names)


def resolve_targets(model: nn.Module, targets: list[str], what: str) -> list[str]:
    found = matching_modules(model, targets)
    missing = [t for t, paths in found.items() if not paths]
    if missing:
        raise TrainConfigError(
            f"{what} target module(s) {', '.join(missing)} match nothing in the base model",
            detail={"missing": missing, "available": _suffixes(model)},
            hint=f"Available {what} module names: {', '.join(_suffixes(model))}",
        )
    return sorted({path for paths in found.values() for path in paths})


def lora_config(config: TrainConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft accepts a float alpha
        lora_dropout=config.dropout,
        target_modules=targets,
        init_lora_weights="gaussian" if config.init == "gaussian" else True,
        use_rslora=config.rslora,
        use_dora=config.dora,
        bias="none",
    )


def _label(component: str) -> str:
    """How messages name a text encoder: 'text-encoder', 'text-encoder-2'."""
    return component.replace("_", "-")


def inject(
    unet: nn.Module, text_encoders: TextEncoders, config: TrainConfig, *, denoiser_name: str = "unet"
) -> Injection:
    """Freeze the whole base, add the LoRA layers, return the (fp32) trainable parameters.
    ``unet``: the denoiser (``denoiser_name``: ``unet``, or ``transformer`` on SD3/Flux)."""
    encoders = text_encoder_map(text_encoders)
    unet.requires_grad_(False)
    for encoder in encoders.values():
        encoder.requires_grad_(False)
    label = "UNet" if denoiser_name == "unet" else denoiser_name
    paths = {denoiser_name: resolve_targets(unet, config.target_modules, label)}
    # peft directly (what diffusers' ``add_adapter`` does), for every model alike: transformers' own
    # PEFT integration demands a newer peft than diffusers does.
    inject_adapter_in_model(lora_config(config, config.target_modules), unet, ADAPTER_NAME)
    for name, encoder in encoders.items():
        paths[name] = []
        if config.train_text_encoder:
            targets = config.text_encoder_target_modules
            paths[name] = resolve_targets(encoder, targets, _label(name))
            inject_adapter_in_model(lora_config(config, targets), encoder, ADAPTER_NAME)
    params = {denoiser_name: _lora_params(unet)} | {name: _lora_params(e) for name, e in encoders.items()}
    for group in params.values():
        for param in group:
            param.data = param.data.float()  # LoRA weights train in fp32 even on a half-precision base
    return Injection(
        paths,
        params,
        lora_config={
            "r": config.rank,
            "lora_alpha": config.lora_alpha,
            "use_rslora": config.rslora,
            "use_dora": config.dora,
            "init_lora_weights": config.init,
            "lora_dropout": config.dropout,
            "target_modules": list(config.target_modules),
            "text_encoder_target_modules": list(config.text_encoder_target_modules)
            if config.train_text_encoder
            else [],
        },
        denoiser=denoiser_name,
    )


def _lora_params(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            params.append(param)
        elif param.requires_grad:
            raise AssertionError(f"base parameter {name} is trainable")
    return params


def base_weights_hash(*models: nn.Module) -> str:
    """sha256 over every non-LoRA parameter and buffer (names without peft's ``base_layer``)."""
    digest = hashlib.sha256()
    for index, model in enumerate(models):
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, tensor in sorted(tensors, key=lambda kv: kv[0]):
            if "lora_" in name:
                continue
            digest.update(f"{index}:{name.replace('.base_layer', '')}:{tuple(tensor.shape)}".encode())
            data = tensor.detach().cpu().contiguous()
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _lora_named(unet: nn.Module, text_encoders: TextEncoders) -> dict[str, nn.Parameter]:
    models = {"unet": unet} | text_encoder_map(text_encoders)
    return {
        f"{component}.{n}": p
        for component, model in models.items()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


def trainable_state(unet: nn.Module, text_encoders: TextEncoders) -> dict[str, torch.Tensor]:
    """Every LoRA parameter by its full parameter name (checkpoints; exact resume)."""
    return {name: p.detach().cpu().clone() for name, p in _lora_named(unet, text_encoders).items()}


def load_trainable_state(
    unet: nn.Module, text_encoders: TextEncoders, state: dict[str, torch.Tensor]
) -> None:
    params = _lora_named(unet, text_encoders)
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise ValueError(
            f"checkpoint LoRA tensors do not match this run (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def _peft_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``<prefix>.<module>.lora_A.weight`` … (adapter name removed), fp32 on CPU."""
    marker = f".{ADAPTER_NAME}."
    return {
        f"{prefix}.{name.replace(marker, '.')}": param.detach().float().cpu().clone()
        for name, param in model.named_parameters()
        if "lora_" in name
    }


def adapter_tensors(
    unet: nn.Module, text_encoders: TextEncoders, with_text_encoder: bool, *, denoiser_name: str = "unet"
) -> dict[str, torch.Tensor]:
    """The adapter in diffusers/PEFT layout, unscaled: ``unet.<path>.lora_A.weight`` (``transformer.…``
    on SD3/Flux), ``text_encoder_2.<path>…`` … (alpha not folded; ``export`` folds the scale into
    ``lora_B`` for the canonical file). DoRA runs also carry ``….lora_magnitude_vector.weight`` entries
    (PEFT's per-output-row magnitudes), which the export keeps: the adapter is then a ``dora`` one."""
    out = _peft_state(unet, denoiser_name)
    if with_text_encoder:
        for name, encoder in text_encoder_map(text_encoders).items():
            out |= _peft_state(encoder, name)
    return out


def set_adapters_enabled(
    unet: nn.Module, text_encoders: TextEncoders, enabled: bool, with_text_encoder: bool
) -> None:
    """Switch between base and base+LoRA (for side-by-side samples)."""
    encoders = list(text_encoder_map(text_encoders).values()) if with_text_encoder else []
    for model in (unet, *encoders):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)
