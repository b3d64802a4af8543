"""Resolve a ``--base-model`` spec to files and load it as a resident pipeline.

Specs: ``tiny-sd`` (the embedded pretrained model, installed from the package on first use under
``$LORASWAP_HOME/models``), ``tiny-sd-random`` (the same architecture with random weights),
``tiny-sdxl-random`` (an SDXL-shaped random model), ``tiny-sd-inpaint-random`` (a 9-channel inpainting
UNet), a local diffusers folder (has ``model_index.json``;
SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1, see ``basemodel.families``), or a single-file ``.safetensors``
checkpoint (SD1.x/SDXL LDM layout, SAI's SD3 layout, BFL's or ComfyUI's Flux layout; what an SD3/Flux
file lacks comes from a ``components`` diffusers folder, ``--base-components``).
Nothing is ever downloaded, and pickle checkpoints (``.ckpt``/``.pt``/``.bin``/``.pth``) are refused
unopened.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch

from basemodel.errors import BaseModelError, ConfigError, UnsafeFormat
from basemodel.families import ModelFamily, detect_folder, detect_pipeline, get_family, read_index
from basemodel.fingerprint import Architecture, fingerprint
from basemodel.random_models import RANDOM_SPECS, ensure_random_tiny
from basemodel.text_encoders import TextEncoderDevice, TextEncoderPlacement
from basemodel.tiny import TINY_NAME, ensure_tiny

log = logging.getLogger(__name__)

# diffusers registers pipeline components at run time, so static checkers cannot see `pipe.unet`
# and friends; the pipeline is typed loosely and its shape is checked by the tests instead.
Pipeline: TypeAlias = Any

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model lives: ``kind`` is 'tiny', 'diffusers' or 'single_file'."""

    name: str
    path: Path
    kind: Literal["tiny", "diffusers", "single_file"]


def resolve_base_model(spec: str, models_dir: Path) -> BaseModelRef:
    if spec == TINY_NAME:
        return BaseModelRef(TINY_NAME, ensure_tiny(models_dir), "tiny")
    if spec in RANDOM_SPECS:
        return BaseModelRef(spec, ensure_random_tiny(models_dir, name=spec), "tiny")
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormat(
            f"refusing to load pickle checkpoint {path.name}",
            detail={"path": str(path)},
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(
                f"{path} is not a diffusers folder (no model_index.json)",
                hint="Pass 'tiny-sd', a diffusers folder saved with save_pretrained, or a .safetensors file.",
            )
        return BaseModelRef(path.resolve().name, path.resolve(), "diffusers")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UnsafeFormat(f"unsupported checkpoint format {path.suffix!r}", detail={"path": str(path)})
        return BaseModelRef(path.stem, path.resolve(), "single_file")
    raise _not_found(spec)


BUILT_IN_NAMES = (TINY_NAME, *RANDOM_SPECS)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _not_found(spec: str) -> BaseModelError:
    """What a spec that is no built-in name, folder or file could have meant: the built-in names (with
    the closest one), and for a Hugging Face Hub id how to get a local folder — nothing is downloaded."""
    names = ", ".join(BUILT_IN_NAMES)
    detail: dict[str, Any] = {"spec": spec, "built_in": list(BUILT_IN_NAMES)}
    extended = [name for name in BUILT_IN_NAMES if name.startswith(spec) and name != spec]
    close = extended[:1] or difflib.get_close_matches(spec, BUILT_IN_NAMES, n=1, cutoff=0.6)
    if close:
        detail["suggestion"] = close[0]
    message = f"base model {spec!r} not found: not a built-in name ({names}), nor a local folder or file"
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        detail["hub_id"] = True
        local = Path("models") / spec.split("/")[-1]
        return BaseModelError(
            f"{message}. It looks like a Hugging Face Hub id: loraswap never downloads models",
            detail=detail,
            hint=f"Download it once yourself, e.g. `hf download {spec} --local-dir {local} "
            '--exclude "*.ckpt" "*.bin" "*.pth"` (huggingface_hub\'s CLI; older versions call it '
            f"huggingface-cli), then pass --base-model {local} (a diffusers folder) or a single "
            ".safetensors checkpoint file.",
        )
    hint = f"Did you mean {close[0]!r}? " if close else ""
    return BaseModelError(
        message,
        detail=detail,
        hint=hint + "Use a built-in name, or a path to a local diffusers folder (with model_index.json) "
        "or .safetensors checkpoint; models are never downloaded.",
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available", hint="Use --device cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 is not supported on CPU", hint="Use --dtype fp32 or --dtype bf16 on CPU.")
    return DTYPES[dtype]


def load_pipeline(
    ref: BaseModelRef, dtype: torch.dtype = torch.float32, components: Path | None = None
) -> Pipeline:
    """Load a pipeline from local files only; never touches the network. ``components``: the diffusers
    folder that completes a single-file SD3/Flux checkpoint (ignored for a diffusers folder)."""
    if ref.kind == "single_file":
        from basemodel.single_file import load_single_file

        pipe: Pipeline = load_single_file(ref.path, torch_dtype=dtype, components=components)
    else:
        family = detect_folder(ref.path)
        extra = family.load_kwargs(read_index(ref.path))
        pipe = family.pipeline_class().from_pretrained(
            ref.path, dtype=dtype, local_files_only=True, use_safetensors=True, **extra
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_attention(pipe: Pipeline, attention: str, device: torch.device) -> str:
    """Select the attention backend; returns the one in use ('sdpa' or 'xformers')."""
    if attention in ("auto", "sdpa"):
        return "sdpa"  # diffusers' default processor is SDPA (AttnProcessor2_0)
    if device.type != "cuda":
        raise ConfigError("xformers attention needs a CUDA device", hint="Use --attention sdpa.")
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # xformers missing or incompatible build
        raise ConfigError(
            f"xformers is unavailable: {exc}",
            hint="pip install 'loraswap[xformers]' or use --attention sdpa.",
        ) from exc
    return "xformers"


@dataclass
class BaseModel:
    """A loaded base model with its identity, ready for the server or the trainer."""

    ref: BaseModelRef
    pipe: Pipeline
    fingerprint: str
    architecture: Architecture
    device: torch.device
    dtype: torch.dtype
    encoders: TextEncoderPlacement | None = None  # where the text encoders run (None: beside the denoiser)

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def family(self) -> ModelFamily:
        return get_family(self.architecture.family)

    @property
    def native_size(self) -> int:
        """Default width and height (the family's rule: the denoiser's sample size in pixels)."""
        return self.family.native_size(self.pipe)

    @property
    def lora_components(self) -> dict[str, Any]:
        """Component name → module for every component LoRA may target (the denoiser first, then the
        text encoders LoRA may touch)."""
        return self.family.lora_components(self.pipe)


def load_base_model(
    spec: str,
    models_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    text_encoder_device: TextEncoderDevice = "cuda",
    components: Path | None = None,
) -> BaseModel:
    """Load ``spec`` (``resolve_base_model``) on ``device``; ``components`` completes a single-file SD3 or
    Flux checkpoint that lacks text encoders, tokenizers or the VAE (``--base-components``)."""
    ref = resolve_base_model(spec, models_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    log.info("loading base model %s (%s) on %s/%s", ref.name, ref.kind, torch_device, torch_dtype)
    pipe = load_pipeline(ref, torch_dtype, components)
    pipe.to(torch_device)
    family = detect_pipeline(pipe)
    family.after_load(pipe)
    apply_attention(pipe, attention, torch_device)
    encoders = TextEncoderPlacement(pipe, family, text_encoder_device, torch_device)
    architecture = family.architecture(pipe)
    return BaseModel(ref, pipe, fingerprint(ref.path), architecture, torch_device, torch_dtype, encoders)
