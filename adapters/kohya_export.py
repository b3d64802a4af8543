"""Canonical tensors → the kohya / A1111 names sd-scripts writes for the base's family.

SD1.x/SD2.x: diffusers-style UNet names (``lora_unet_down_blocks_…``) and ``lora_te_…``; SDXL: the SGM
UNet names of ``adapters.kohya_ldm`` and ``lora_te1_…``/``lora_te2_…``; LyCORIS kinds keep their roles
(``adapters.lycoris``); Flux and SD3: the original model's names, fused where it fuses
(``adapters.community_export``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters import embedding, lycoris
from adapters.community import layout_of
from adapters.community_export import to_community_kohya
from adapters.errors import AdapterInvalid
from adapters.kohya_ldm import UnsupportedUNet, kohya_unet_names
from adapters.normalise import TEXT_MODEL
from basemodel.families import ModelFamily, find_family, get_family
from basemodel.fingerprint import Architecture


def to_kohya(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture | None = None
) -> dict[str, torch.Tensor]:
    """Canonical tensors → kohya/A1111 keys (``.lora_down``/``.lora_up``/``.alpha`` = rank).

    The names are the ones sd-scripts writes for the base's family (``ModelFamily.kohya_prefixes`` and
    ``kohya_unet_layout``): SD1.x/SD2.x ``lora_unet_down_blocks_…`` + ``lora_te_…``; SDXL LDM/SGM UNet
    names from the UNet config (``lora_unet_input_blocks_…``) + ``lora_te1_…``/``lora_te2_…``. Without
    an architecture, or for a family no registry knows, SD1.x's. Text-encoder names get the
    conventional ``text_model_`` level back when the base model lacks it.
    """
    family = (find_family(architecture.family) if architecture is not None else None) or get_family("sd1")
    unet_names = _export_unet_names(family, architecture)
    if embedding.is_canonical(tensors):  # textual inversion: A1111's layout
        return embedding.to_a1111(tensors)
    layout = layout_of(architecture) if architecture is not None else None
    if layout is not None:  # Flux / SD3: the original model's names, fused where it fuses
        prefixes = {c: p for p, c in list(layout.text_prefixes.items())[::-1] if p.startswith("lora_")}
        return to_community_kohya(tensors, layout, lambda module: _text_name(module, prefixes))

    if lycoris.is_lycoris(tensors):
        return lycoris.lycoris_to_kohya(tensors, lambda module: _kohya_name(module, family, unet_names))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(tensors.items()):
        module, role = key.rsplit(".lora_", 1)
        name = _kohya_name(module, family, unet_names)
        if role == "A.weight":
            out[f"{name}.lora_down.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]), dtype=torch.float32)
        elif role == "B.weight":
            out[f"{name}.lora_up.weight"] = tensor
        else:
            raise AdapterInvalid(f"not a canonical key: {key}", reason="not_canonical")
    return out


def _export_unet_names(family: ModelFamily, architecture: Architecture | None) -> Mapping[str, str]:
    """diffusers UNet path → kohya name, for a family whose kohya names are LDM/SGM ones; empty: the
    diffusers path with ``_`` for ``.``. A UNet the LDM layout does not describe keeps diffusers-style
    names, which kohya readers (diffusers, A1111, loraswap) accept too."""
    config = architecture.unet_config if architecture is not None else None
    if family.kohya_unet_layout != "ldm" or config is None:
        return {}
    try:
        return {path: name for name, path in kohya_unet_names(config).items()}
    except UnsupportedUNet:
        return {}


def _kohya_name(module: str, family: ModelFamily, unet_names: Mapping[str, str]) -> str:
    component, path = module.split(".", 1)
    try:
        prefix = family.kohya_prefix(component)
    except KeyError:
        raise AdapterInvalid(
            f"cannot export module {module} to {family.label} kohya names", reason="not_canonical"
        ) from None
    if component == "unet":
        return prefix + unet_names.get(path, path.replace(".", "_"))
    return _text_name(module, {component: prefix})


def _text_name(module: str, prefixes: Mapping[str, str]) -> str:
    """A text-encoder module's kohya name (``lora_te1_text_model_…``) with its component's prefix."""
    component, path = module.split(".", 1)
    if component not in prefixes:
        raise AdapterInvalid(f"cannot export module {module} to kohya names", reason="not_canonical")
    if not path.startswith((TEXT_MODEL, "text_projection")):  # CLIPTextModelWithProjection's own
        path = TEXT_MODEL + path
    return prefixes[component] + path.replace(".", "_")
