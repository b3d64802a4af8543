"""What single-file (LDM/SGM-layout) checkpoint loading shares between families: the shipped config
folders, the component key prefixes, the offline CLIP tokenizers and schedulers, and strict weight
conversion and assignment (``converted``, ``assign_weights``) with errors that name the component.

``basemodel.single_file`` reads and checks a file and dispatches on its family; each family's assembly
(``_assemble_sd1`` there, ``basemodel.families.sdxl.single_file`` for SDXL) builds on these helpers.
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
from diffusers import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from basemodel.errors import BaseModelError
from basemodel.families import read_json
from basemodel.tokenizer import BOS, EOS, _bytes_to_unicode

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SD15_CONFIG_DIR = CONFIGS_DIR / "sd15"
SDXL_CONFIG_DIR = CONFIGS_DIR / "sdxl"
CLIP_BPE_PATH = CONFIGS_DIR / "clip_bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
COMPONENT_PREFIXES = {UNET_PREFIX: "UNet", VAE_PREFIX: "VAE", CLIP_PREFIX: "CLIP text encoder"}
HINT = (
    "Pass an SD1.x (SD1.4/1.5), SDXL, SD3/SD3.5 or Flux.1 text-to-image checkpoint in .safetensors, or a "
    "diffusers folder."
)


def clip_text_encoder(
    state: dict[str, torch.Tensor], prefix: str, config_folder: Path, path: Path, torch_dtype: torch.dtype
) -> CLIPTextModel:
    """A CLIP text encoder from LDM keys under ``prefix`` (transformers' names with a prefix)."""
    text_config = CLIPTextConfig.from_dict(read_json(config_folder / "config.json"))
    with init_empty_weights():
        text_encoder = CLIPTextModel(text_config)
    clip_state = _convert_clip(state, prefix, nested=hasattr(text_encoder, "text_model"))
    assign_weights(text_encoder, clip_state, "CLIP text encoder", path, torch_dtype)
    return text_encoder


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str | None = None) -> CLIPTokenizer:
    """CLIP ViT-L/14's tokenizer (49408 tokens), built from the vendored BPE merges as CLIP does;
    OpenCLIP ViT-bigG (SDXL's ``tokenizer_2``) is the same with ``pad_token="!"``."""
    vocab, merges = _clip_vocab_and_merges()
    pairs: Any = list(merges)  # tokenizers takes (a, b) pairs; transformers' hint says list[str]
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length, **extra)


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


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """The folder's own tokenizer files if it has them, else CLIP's from the vendored merges (with the
    folder's ``model_max_length`` and ``pad_token``)."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = read_json(folder / "tokenizer_config.json") if folder.is_dir() else {}
    pad = settings.get("pad_token")
    return build_clip_tokenizer(
        int(settings.get("model_max_length", 77)), pad if isinstance(pad, str) else None
    )


def load_scheduler(config_file: Path) -> SchedulerMixin:
    config = read_json(config_file)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise BaseModelError(
            f"{config_file} names no known diffusers scheduler: {config.get('_class_name')!r}"
        )
    scheduler: SchedulerMixin = cls.from_config(config)
    return scheduler


def converted(
    component: str, path: Path, convert: Callable[..., dict[str, Any]], *args: Any
) -> dict[str, Any]:
    """diffusers' converter's result; the errors it raises on missing or misshapen tensors (a
    ``KeyError`` naming the LDM key, …) become a ``BaseModelError`` that names the component."""
    try:
        return convert(*args)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise BaseModelError(
            f"{path.name}: the {component} weights cannot be converted: missing or misshapen {exc}",
            detail={"path": str(path), "component": component},
            hint=HINT,
        ) from exc


def subset(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in state.items() if key.startswith(prefix)}


def _convert_clip(state: dict[str, torch.Tensor], prefix: str, nested: bool) -> dict[str, torch.Tensor]:
    """LDM CLIP keys under ``prefix`` to transformers', old (no ``text_model.``) and new layouts alike."""
    converted: dict[str, torch.Tensor] = {}
    for full_key, tensor in subset(state, prefix).items():
        key = full_key.removeprefix(prefix).removeprefix("text_model.")
        if key == "embeddings.position_ids":  # a buffer, rebuilt by the model; often stale in merges
            continue
        converted[f"text_model.{key}" if nested else key] = tensor
    return converted


def assign_weights(
    model: torch.nn.Module,
    state: dict[str, Any],
    component: str,
    path: Path,
    dtype: torch.dtype,
    hint: str = HINT,
) -> None:
    """Load ``state`` into a meta-initialised model strictly, with a readable error on any mismatch.
    ``state``'s tensors are replaced by their ``dtype`` casts."""
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
            hint=hint,
        )
    for key in given:  # cast one tensor at a time, dropping the original from ``state`` as it goes, so a
        # bf16 file loaded as fp16 never holds two copies of the whole model in host memory
        state[key] = given[key] = given[key].to(dtype)
    model.load_state_dict(given, strict=True, assign=True)
    model.eval()  # these models hold no float buffers, so the assigned tensors set the dtype
