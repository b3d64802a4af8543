"""The diffusers export: canonical tensors as a file every diffusers-format reader loads.

The canonical layout (what the registry stores) names text-encoder modules as the loaded model does:
PEFT ``lora_A``/``lora_B`` keys, and no ``text_model.`` level for a CLIPTextModel from transformers 5.
The export differs in two ways, for the readers outside:

* text-encoder keys get the conventional ``text_model.`` level (transformers 4's names, which older
  diffusers, ComfyUI and kohya-style tools expect; diffusers 0.42 strips it for a flattened encoder);
* diffusers' text-encoder loader infers the state dict's type from an attention key: PEFT keys pass only
  when one of them is a CLIP attention projection (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``),
  which it renames to its own ``lora_linear_layer`` naming first. A text-encoder LoRA without one (on the
  MLP only, ``fc1``/``fc2``) failed with "Could not automatically infer state dict type". Such an
  encoder's keys are written in that naming (``….lora_linear_layer.down.weight``/``up``), what diffusers'
  ``save_lora_weights`` writes for CLIP attention, which the loader reads for any module.

UNet keys, and text encoders with an attention projection, stay PEFT ``lora_A``/``lora_B`` (layout
``diffusers``); a file with an MLP-only text-encoder LoRA reads back as ``diffusers-legacy``.

A DoRA whose magnitudes follow PEFT's rule (``dora_magnitude``, one per output row: what ``loraswap
train --dora`` trains) is written in PEFT's own DoRA layout: ``….lora_A.weight``, ``….lora_B.weight``
(alpha/rank folded in) and ``….lora_magnitude_vector`` (``[out]``; PEFT's ``[1, out, 1, 1]`` for a
conv), every module in PEFT naming (diffusers' ``lora_linear_layer`` naming has no magnitude), and the
header's ``ss_network_args`` says DoRA as LyCORIS' kohya network arguments do (``dora_wd``, and
``wd_on_output``: the per-row axis). diffusers' ``load_lora_weights`` turns on PEFT's ``use_dora`` for
such keys. A text encoder's magnitude is written ``….lora_magnitude_vector.weight`` (the name of PEFT's
parameter less the adapter name): diffusers 0.42 hands text-encoder LoRAs to transformers 5, whose loader
maps that name onto the layer but not PEFT's saved ``….lora_magnitude_vector`` (it would keep the
magnitude PEFT initialises from the base weight); PEFT's own loader, used for the UNet/transformer,
accepts both. A kohya/LyCORIS DoRA (``dora_scale``: its own axis and ComfyUI's weight rule) has no PEFT
layout and is refused (``unsupported_conversion``).

The kohya export (``write_kohya``) is the other interchange layout: sd-scripts' names, alpha = rank.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from adapters.errors import AdapterInvalid
from adapters.format import complete_metadata, serialise, write_bytes_atomic
from adapters.kinds import group
from adapters.metadata import METADATA_KEY, AdapterMetadata, interop_keys
from basemodel.fingerprint import Architecture

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TEXT_MODEL = "text_model."
ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
LINEAR_LAYER = {
    "lora_A.weight": "lora_linear_layer.down.weight",
    "lora_B.weight": "lora_linear_layer.up.weight",
}
PEFT_DORA = {
    "dora_down": "lora_A.weight",
    "dora_up": "lora_B.weight",
    "dora_magnitude": "lora_magnitude_vector",
}
# LyCORIS' kohya network arguments for a DoRA normalised per output row (sd-scripts writes them as strings)
DORA_NETWORK_ARGS = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}


def _split(key: str) -> tuple[str, str, str]:
    """(component, module path, role) of a canonical key, role ``lora_A.weight`` or ``lora_B.weight``."""
    component, rest = key.split(".", 1)
    module, role = rest.rsplit(".lora_", 1)
    return component, module, "lora_" + role


def to_diffusers(tensors: Mapping[str, torch.Tensor], *, peft_names: bool = False) -> dict[str, torch.Tensor]:
    """Canonical LoRA tensors (or PEFT DoRA keys, ``peft_names``: never ``lora_linear_layer``) → the
    diffusers export's keys (see the module docstring)."""
    parts = {key: _split(key) for key in tensors}
    with_attention = {c for c, module, _ in parts.values() if peft_names or module.endswith(ATTENTION)}
    out: dict[str, torch.Tensor] = {}
    for key, (component, module, role) in sorted(parts.items()):
        if component not in TEXT_ENCODERS:
            out[key] = tensors[key]
            continue
        if not module.startswith((TEXT_MODEL, "text_projection")):
            module = TEXT_MODEL + module
        out[f"{component}.{module}.{role if component in with_attention else LINEAR_LAYER[role]}"] = tensors[
            key
        ]
    return out


def write_diffusers(
    path: Path | None,
    tensors: dict[str, torch.Tensor],
    metadata: AdapterMetadata,
    architecture: Architecture | None = None,
) -> bytes:
    """Export canonical LoRA tensors for diffusers' ``load_lora_weights`` (any text-encoder module set),
    with the same ``loraswap`` metadata and interop header keys as ``write_adapter`` (``architecture``:
    the base's, so they name the family's variant); the bytes, also written atomically to ``path`` when
    given."""
    metadata = complete_metadata(tensors, metadata)
    if metadata.kind not in (None, "lora", "dora"):
        raise AdapterInvalid(
            f"a {metadata.kind} adapter has no diffusers (PEFT LoRA) layout", reason="unsupported_conversion"
        )
    header = {
        METADATA_KEY: metadata.to_json(),
        **interop_keys(metadata, architecture.unet_config if architecture else None),
    }
    if metadata.kind == "dora":
        tensors = peft_dora(tensors)
        header["ss_network_args"] = json.dumps(DORA_NETWORK_ARGS)
    data = serialise(to_diffusers(tensors, peft_names=metadata.kind == "dora"), header)
    if path is not None:
        write_bytes_atomic(Path(path), data)
    return data


def peft_dora(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical DoRA tensors with PEFT magnitudes → PEFT's DoRA keys (``lora_A.weight``,
    ``lora_B.weight``, ``lora_magnitude_vector``; a conv's magnitude ``[1, out, 1, 1]`` as PEFT holds it).
    A kohya/LyCORIS ``dora_scale`` module is refused: its axis and weight rule are not PEFT's."""
    modules, stray = group(tensors)
    kohya = sorted(m for m, factors in modules.items() if "dora_scale" in factors)
    if stray or kohya:
        raise AdapterInvalid(
            f"module {(kohya or stray)[0]} is not a PEFT DoRA module: only DoRA magnitudes per output row "
            "with PEFT's weight rule (lora_magnitude_vector) have a PEFT layout",
            reason="unsupported_conversion",
            hint="Use --to kohya for kohya/LyCORIS DoRA files (dora_scale).",
        )
    out: dict[str, torch.Tensor] = {}
    for module, factors in modules.items():
        text_encoder = module.split(".", 1)[0] in TEXT_ENCODERS
        for role, tensor in factors.items():
            name = PEFT_DORA[role]
            if role == "dora_magnitude" and factors["dora_down"].dim() == 4:
                tensor = tensor.reshape(1, -1, 1, 1)
            if role == "dora_magnitude" and text_encoder:  # the name transformers' loader maps (docstring)
                name += ".weight"
            out[f"{module}.{name}"] = tensor
    return out
