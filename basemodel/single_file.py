"""Load a single-file SD1.x checkpoint (A1111/CivitAI style, original LDM key layout) fully offline.

The file must be ``.safetensors``: nothing is ever unpickled. Component configs come from a local
diffusers-format folder (``configs/sd15`` by default: SD1.5's own configs, no weights) and the CLIP
ViT-L/14 tokenizer is rebuilt from the vendored OpenAI BPE merges, so the Hub is never contacted.
Weights are converted with diffusers' LDM→diffusers helpers and loaded strictly: a missing,
unexpected or misshapen tensor is a ``BaseModelError`` that says what was found.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from basemodel.errors import BaseModelError, UnsafeFormat
from basemodel.families import FAMILIES, detect_checkpoint, read_json
from basemodel.families.sd1 import SD1
from basemodel.tokenizer import BOS, EOS, _bytes_to_unicode

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SD15_CONFIG_DIR = CONFIGS_DIR / "sd15"
CLIP_BPE_PATH = CONFIGS_DIR / "clip_bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
COMPONENT_PREFIXES = {UNET_PREFIX: "UNet", VAE_PREFIX: "VAE", CLIP_PREFIX: "CLIP text encoder"}

# The family this loader converts; other families' checkpoints are recognised (``detect_checkpoint``)
# and refused by name, and so are these other layouts, checked in this order.
LOADS = SD1()
OTHER_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("conditioner.embedders.", "an SDXL-style checkpoint (conditioner.embedders.* keys)"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint (joint_blocks keys)"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint (double_blocks keys)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks keys)"),
    ("lora_unet_", "a LoRA adapter (lora_unet_* keys), not a base model"),
    ("lora_te", "a LoRA adapter (lora_te* keys), not a base model"),
)
HINT = "Pass an SD1.x (SD1.4/1.5 family) text-to-image checkpoint in .safetensors, or a diffusers folder."


def load_single_file(
    path: Path, torch_dtype: torch.dtype = torch.float32, config_dir: Path | None = None
) -> StableDiffusionPipeline:
    """Load an SD1.x LDM-layout ``.safetensors`` checkpoint as a StableDiffusionPipeline, offline.

    ``config_dir`` is a diffusers-format folder whose component configs (``unet``, ``vae``,
    ``text_encoder``, ``scheduler``, ``tokenizer``) describe the checkpoint; it defaults to the
    shipped SD1.5 configs. Only its configs and tokenizer are read, never weights.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UnsafeFormat(
            f"refusing to load {path.name}: only .safetensors single-file checkpoints are supported",
            detail={"path": str(path)},
        )
    if not path.is_file():
        raise BaseModelError(f"checkpoint {path} not found", detail={"path": str(path)})
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
    unet_config = read_json(config_dir / "unet" / "config.json")
    state = _read_checkpoint(path, unet_config)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    unet_state = convert_ldm_unet_checkpoint(_subset(state, UNET_PREFIX), unet_config)
    _assign(unet, unet_state, "UNet", path, torch_dtype)

    vae_config = read_json(config_dir / "vae" / "config.json")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(vae_config)
    vae_state = convert_ldm_vae_checkpoint(_subset(state, VAE_PREFIX), vae_config)
    _assign(vae, vae_state, "VAE", path, torch_dtype)

    text_config = CLIPTextConfig.from_dict(read_json(config_dir / "text_encoder" / "config.json"))
    with init_empty_weights():
        text_encoder = CLIPTextModel(text_config)
    clip_state = _convert_clip(state, nested=hasattr(text_encoder, "text_model"))
    _assign(text_encoder, clip_state, "CLIP text encoder", path, torch_dtype)

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(config_dir / "tokenizer"),
        unet=unet,
        scheduler=_load_scheduler(config_dir / "scheduler" / "scheduler_config.json"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP ViT-L/14's tokenizer (49408 tokens), built from the vendored BPE merges as CLIP does."""
    vocab, merges = _clip_vocab_and_merges()
    pairs: Any = list(merges)  # tokenizers takes (a, b) pairs; transformers' hint says list[str]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(CLIP_BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : 49152 - 256 - 2 + 1]:
        first, second = line.split()
        merges.append((first, second))
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise BaseModelError(f"{CLIP_BPE_PATH.name} gives {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {token: i for i, token in enumerate(tokens)}, merges


def _load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The folder's own tokenizer files if it has them, else CLIP ViT-L/14's from the vendored merges."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = read_json(folder / "tokenizer_config.json") if folder.is_dir() else {}
    return build_clip_tokenizer(int(settings.get("model_max_length", 77)))


def _load_scheduler(config_file: Path) -> SchedulerMixin:
    config = read_json(config_file)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BaseModelError(
            f"{config_file} names no known diffusers scheduler: {config.get('_class_name')!r}"
        )
    scheduler: SchedulerMixin = cls.from_config(config)
    return scheduler


def _read_checkpoint(path: Path, unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Check the layout from keys and shapes, then read only the SD1.x component tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            _check_layout(path, keys, lambda key: list(handle.get_slice(key).get_shape()), unet_config)
            return {key: handle.get_tensor(key) for key in keys if key.startswith(tuple(COMPONENT_PREFIXES))}
    except BaseModelError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or garbage files
        raise BaseModelError(
            f"{path.name} is not a readable .safetensors file: {exc}",
            detail={"path": str(path)},
            hint="The file may be truncated or corrupt; download it again.",
        ) from exc


def _check_layout(
    path: Path, keys: list[str], shape_of: Callable[[str], list[int]], unet_config: dict[str, Any]
) -> None:
    def refuse(found: str) -> BaseModelError:
        return BaseModelError(
            f"{path.name} is not an SD1.x checkpoint: detected {found}",
            detail={"path": str(path), "detected": found},
            hint=HINT,
        )

    if not keys:
        raise refuse("an empty file (no tensors)")
    family = detect_checkpoint(keys)
    if family is not None and family.name != LOADS.name:
        raise refuse(family.checkpoint_description)
    for prefix, layout in OTHER_LAYOUTS:
        if any(key.startswith(prefix) for key in keys):
            raise refuse(layout)
    if any(".lora_down." in key or ".lora_A." in key for key in keys):
        raise refuse("a LoRA adapter (lora_down/lora_A keys), not a base model")
    present = [prefix for prefix in COMPONENT_PREFIXES if any(key.startswith(prefix) for key in keys)]
    if not present:
        tops = sorted({key.split(".", 1)[0] for key in keys})
        raise refuse(f"an unknown layout (top-level key prefixes: {', '.join(tops[:8])})")
    missing = [f"{COMPONENT_PREFIXES[p]} ({p}*)" for p in COMPONENT_PREFIXES if p not in present]
    if missing:
        raise refuse(f"an incomplete LDM checkpoint without {' or '.join(missing)} weights")
    conv_in, expected = f"{UNET_PREFIX}input_blocks.0.0.weight", unet_config.get("in_channels")
    if conv_in in keys and shape_of(conv_in)[1] != expected:
        channels = shape_of(conv_in)[1]
        kind = {9: "an inpainting UNet", 8: "an instruct-pix2pix UNet"}.get(channels, "a UNet")
        raise refuse(f"{kind} with {channels} input channels; the config expects {expected}")
    to_k = next(
        (key for key in keys if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")), None
    )
    expected = unet_config.get("cross_attention_dim")
    if to_k is not None and shape_of(to_k)[1] != expected:
        context = shape_of(to_k)[1]
        width = {f.context_width: f" ({f.label})" for f in FAMILIES if f.name != LOADS.name}.get(context, "")
        raise refuse(f"a UNet with cross-attention width {context}{width}; the config expects {expected}")


def _subset(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in state.items() if key.startswith(prefix)}


def _convert_clip(state: dict[str, torch.Tensor], nested: bool) -> dict[str, torch.Tensor]:
    """LDM CLIP keys to transformers', old (no ``text_model.``) and new layouts alike."""
    converted: dict[str, torch.Tensor] = {}
    for full_key, tensor in _subset(state, CLIP_PREFIX).items():
        key = full_key.removeprefix(CLIP_PREFIX).removeprefix("text_model.")
        if key == "embeddings.position_ids":  # a buffer, rebuilt by the model; often stale in merges
            continue
        converted[f"text_model.{key}" if nested else key] = tensor
    return converted


def _assign(
    model: torch.nn.Module, state: dict[str, Any], component: str, path: Path, dtype: torch.dtype
) -> None:
    """Load ``state`` into a meta-initialised model strictly, with a readable error on any mismatch."""
    expected = model.state_dict()
    given = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshapen = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(given) & set(expected))
        if given[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} {len(items)} ({', '.join(items[:3])})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if items
    ]
    if problems:
        raise BaseModelError(
            f"{path.name}: the {component} weights do not match the model config: {'; '.join(problems)}",
            detail={"path": str(path), "component": component},
            hint=HINT,
        )
    model.load_state_dict({k: v.to(dtype) for k, v in given.items()}, strict=True, assign=True)
    model.eval()  # SD1.x models hold no float buffers, so the assigned tensors set the dtype
