"""Load a single-file checkpoint fully offline: SD1.x or SDXL (A1111/CivitAI style, LDM/SGM key layout),
SD3/SD3.5 (SAI's layout) or Flux.1 (BFL's and ComfyUI's layouts).

The file must be ``.safetensors``: nothing is ever unpickled. Its family is detected from its keys
(``basemodel.families.detect_checkpoint``). The transformer families' files are loaded by their family
modules (``TRANSFORMER_LOADERS``: ``basemodel.families.sd3.single_file``,
``basemodel.families.flux.single_file``, on ``basemodel.single_file_mmdit``), completed from a diffusers
folder (``components``: ``--base-components``) when the file lacks text encoders or the VAE; the rest of
this docstring is about the UNet families. Component configs come from a local diffusers-format
folder (by default the shipped ``configs/sd15`` or ``configs/sdxl``: the released models' own configs,
no weights) and the CLIP tokenizers (ViT-L/14 and OpenCLIP ViT-bigG share the BPE) are rebuilt from
the vendored OpenAI BPE merges, so the Hub is never contacted. Weights are converted with diffusers'
LDM→diffusers helpers and loaded strictly: a missing, unexpected or misshapen tensor is a
``BaseModelError`` that says what was found. The shared helpers live in
``basemodel.single_file_parts``, SDXL's assembly in ``basemodel.families.sdxl.single_file``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open

from basemodel.errors import BaseModelError, UnsafeFormat
from basemodel.families import FAMILIES, detect_checkpoint, read_json
from basemodel.families.flux import single_file as flux_single_file
from basemodel.families.sd1 import SD1
from basemodel.families.sd3 import single_file as sd3_single_file
from basemodel.families.sdxl.single_file import SDXL_COMPONENTS, assemble_sdxl
from basemodel.single_file_mmdit import read_header
from basemodel.single_file_parts import (
    CLIP_PREFIX,
    COMPONENT_PREFIXES,
    HINT,
    SD15_CONFIG_DIR,
    SDXL_CONFIG_DIR,
    UNET_PREFIX,
    VAE_PREFIX,
    assign_weights,
    build_clip_tokenizer,
    clip_text_encoder,
    converted,
    load_scheduler,
    load_tokenizer,
    subset,
)

__all__ = [
    "LAYOUTS",
    "SD15_CONFIG_DIR",
    "SDXL_CONFIG_DIR",
    "TRANSFORMER_LOADERS",
    "build_clip_tokenizer",
    "load_single_file",
    "load_tokenizer",
]


@dataclass(frozen=True)
class Layout:
    """One family's single-file layout: its shipped configs, its component key prefixes (→ in words)
    and the function that assembles the pipeline from the checkpoint's tensors."""

    config_dir: Path
    components: dict[str, str]
    assemble: Callable[..., Any]


# The families this loader converts; other families' checkpoints are recognised (``detect_checkpoint``)
# and refused by name, and so are these other layouts, checked in this order.
LOADS = SD1()
OTHER_LAYOUTS: tuple[tuple[str, str], ...] = (
    (
        "conditioner.embedders.",
        "an SDXL-style checkpoint without both text encoders (conditioner.embedders.*)",
    ),
    ("model.diffusion_model.joint_blocks.", "an SD3-like checkpoint without SD3's first joint block"),
    ("model.diffusion_model.double_blocks.", "a Flux-like checkpoint without Flux.1's first double block"),
    ("double_blocks.", "a Flux-like checkpoint without Flux.1's first double block"),
    ("lora_unet_", "a LoRA adapter (lora_unet_* keys), not a base model"),
    ("lora_te", "a LoRA adapter (lora_te* keys), not a base model"),
)


def load_single_file(
    path: Path,
    torch_dtype: torch.dtype = torch.float32,
    config_dir: Path | None = None,
    components: Path | None = None,
) -> Any:
    """Load a ``.safetensors`` checkpoint as its family's pipeline, offline.

    SD1.x/SDXL: ``config_dir`` is a diffusers-format folder whose component configs (``unet``, ``vae``, the
    text encoder(s), ``scheduler``, the tokenizer(s)) describe the checkpoint; it defaults to the shipped
    configs of the checkpoint's family. Only its configs and tokenizers are read. Their files hold every
    component, so ``components`` is not used for them.
    SD3/Flux: ``components`` (else ``config_dir``) is a diffusers folder of the family that supplies what
    the file lacks, as ``FluxPipeline.from_pretrained(folder, transformer=...)`` does.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UnsafeFormat(
            f"refusing to load {path.name}: only .safetensors single-file checkpoints are supported",
            detail={"path": str(path)},
        )
    if not path.is_file():
        raise BaseModelError(f"checkpoint {path} not found", detail={"path": str(path)})
    keys = _read_keys(path)
    family = _family_of(path, keys)
    if family in TRANSFORMER_LOADERS:
        with _readable(path):
            header = read_header(path)
        folder = components if components is not None else config_dir
        return TRANSFORMER_LOADERS[family](path, header, torch_dtype, folder)
    layout = LAYOUTS[family]
    config_dir = Path(config_dir) if config_dir is not None else layout.config_dir
    unet_config = read_json(config_dir / "unet" / "config.json")
    state = _read_checkpoint(path, layout, unet_config)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    unet_state = converted("UNet", path, convert_ldm_unet_checkpoint, subset(state, UNET_PREFIX), unet_config)
    assign_weights(unet, unet_state, "UNet", path, torch_dtype)

    vae_config = read_json(config_dir / "vae" / "config.json")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(vae_config)
    vae_state = converted("VAE", path, convert_ldm_vae_checkpoint, subset(state, VAE_PREFIX), vae_config)
    assign_weights(vae, vae_state, "VAE", path, torch_dtype)
    return layout.assemble(state, unet, vae, config_dir, path, torch_dtype)


def _assemble_sd1(
    state: dict[str, torch.Tensor],
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    config_dir: Path,
    path: Path,
    torch_dtype: torch.dtype,
) -> StableDiffusionPipeline:
    text_encoder = clip_text_encoder(state, CLIP_PREFIX, config_dir / "text_encoder", path, torch_dtype)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(config_dir / "tokenizer"),
        unet=unet,
        scheduler=load_scheduler(config_dir / "scheduler" / "scheduler_config.json"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


LAYOUTS = {
    "sd1": Layout(SD15_CONFIG_DIR, COMPONENT_PREFIXES, _assemble_sd1),
    "sdxl": Layout(SDXL_CONFIG_DIR, SDXL_COMPONENTS, assemble_sdxl),
}
# The transformer families: (path, {key: shape}, dtype, components folder or None) → pipeline
TransformerLoader = Callable[[Path, Mapping[str, tuple[int, ...]], torch.dtype, Path | None], Any]
TRANSFORMER_LOADERS: dict[str, TransformerLoader] = {
    "sd3": sd3_single_file.load,
    "flux": flux_single_file.load,
}


def _read_keys(path: Path) -> list[str]:
    with _readable(path), safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseModelError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or garbage files
        raise BaseModelError(
            f"{path.name} is not a readable .safetensors file: {exc}",
            detail={"path": str(path)},
            hint="The file may be truncated or corrupt; download it again.",
        ) from exc


def _refusal(path: Path, found: str) -> BaseModelError:
    return BaseModelError(
        f"{path.name} is not an SD1.x, SDXL, SD3/SD3.5 or Flux.1 checkpoint: detected {found}",
        detail={"path": str(path), "detected": found},
        hint=HINT,
    )


def _family_of(path: Path, keys: list[str]) -> str:
    """The name of the checkpoint's family; other families and layouts are refused by name. A file
    no family claims is checked as SD1.x's, whose messages then say which component is missing."""
    if not keys:
        raise _refusal(path, "an empty file (no tensors)")
    family = detect_checkpoint(keys)
    if family is not None:
        if family.name not in LAYOUTS and family.name not in TRANSFORMER_LOADERS:
            raise _refusal(path, family.checkpoint_description)
        return family.name
    for prefix, layout in OTHER_LAYOUTS:
        if any(key.startswith(prefix) for key in keys):
            raise _refusal(path, layout)
    return LOADS.name


def _read_checkpoint(path: Path, layout: Layout, unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Check the components from keys and shapes, then read only the component tensors."""
    with _readable(path), safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        _check_components(
            path, keys, lambda key: list(handle.get_slice(key).get_shape()), layout, unet_config
        )
        return {key: handle.get_tensor(key) for key in keys if key.startswith(tuple(layout.components))}


def _check_components(
    path: Path,
    keys: list[str],
    shape_of: Callable[[str], list[int]],
    layout: Layout,
    unet_config: dict[str, Any],
) -> None:
    if any(".lora_down." in key or ".lora_A." in key for key in keys):
        raise _refusal(path, "a LoRA adapter (lora_down/lora_A keys), not a base model")
    components = layout.components
    present = [prefix for prefix in components if any(key.startswith(prefix) for key in keys)]
    if not present:
        tops = sorted({key.split(".", 1)[0] for key in keys})
        raise _refusal(path, f"an unknown layout (top-level key prefixes: {', '.join(tops[:8])})")
    missing = [f"{components[p]} ({p}*)" for p in components if p not in present]
    if missing:
        raise _refusal(path, f"an incomplete LDM checkpoint without {' or '.join(missing)} weights")
    conv_in, expected = f"{UNET_PREFIX}input_blocks.0.0.weight", unet_config.get("in_channels")
    if conv_in in keys and shape_of(conv_in)[1] != expected:
        channels = shape_of(conv_in)[1]
        kind = {9: "an inpainting UNet", 8: "an instruct-pix2pix UNet"}.get(channels, "a UNet")
        raise _refusal(path, f"{kind} with {channels} input channels; the config expects {expected}")
    to_k = next(
        (key for key in keys if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")), None
    )
    expected = unet_config.get("cross_attention_dim")
    if to_k is not None and shape_of(to_k)[1] != expected:
        context = shape_of(to_k)[1]
        width = {f.context_width: f" ({f.label})" for f in FAMILIES}.get(context, "")
        raise _refusal(
            path, f"a UNet with cross-attention width {context}{width}; the config expects {expected}"
        )
