"""The SDXL shapes: an SDXL-shaped random pipeline built in place from configs, its weights cached on disk.

``sdxl`` takes the shipped SDXL base configs (``basemodel/configs/sdxl``: a 2.6 B-parameter UNet, CLIP
ViT-L and OpenCLIP ViT-bigG-shaped text encoders, the SDXL VAE, the Euler scheduler, the offline
tokenizers); ``tiny-sdxl`` takes tiny-sdxl-random's configs and tokenizer
(``basemodel.families.sdxl.tiny``), so a test covers the same code path in seconds. Nothing is downloaded.

How the weights come to be, without a second copy of the model in memory:

* every component is constructed on the meta device and given storage with ``to_empty`` in the dtype
  it runs in; nothing is built in fp32 and converted afterwards;
* the values are PyTorch's default initialisation (each module's own ``reset_parameters``, in place,
  from one seeded generator), rounded to fp16 — the dtype they are stored in on disk;
* they are written once, tensor by tensor, to ``<cache>/<shape>-random-<key>/<component>.safetensors``
  (fp16), ``key`` a hash of the configs, the seed and ``INIT_VERSION``; a later run with the same key
  reads them back tensor by tensor (plain reads, no mmap, so the file is never resident beside the
  model) instead of drawing 3.5 B random numbers again.

On a CPU the model runs in fp32 (fp16/bf16 matmuls and convolutions are 7-100× slower than fp32 on a CPU
without AVX-512 BF16/FP16). The text encoders, which no LoRA in the benchmark touches, are then stored
in fp16 and cast to fp32 around each layer's forward (diffusers' ``apply_layerwise_casting``;
embeddings and norms stay fp32): 1.5 GiB less resident, about a second more per prompt encoding, the
same for the base and the adapter requests. The UNet and the VAE are plain fp32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

INIT_VERSION = 1  # bump when the way values are drawn changes (a new cache key)
COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet")  # built in this order, from one generator
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
STORED = torch.float16  # on disk
ST_DTYPE = "F16"
# RMS norms (diffusers' in the MMDiT transformers, T5's): weight 1 (and bias 0, where there is one)
RMS_NORMS = ("RMSNorm", "T5LayerNorm")


@dataclass(frozen=True)
class SDXLShape:
    """What a random SDXL-shaped pipeline is built from: component configs and the two tokenizers."""

    name: str
    configs: dict[str, dict[str, Any]]  # unet, vae, text_encoder, text_encoder_2, scheduler
    tokenizers: Callable[[], tuple[Any, Any]]
    force_zeros_for_empty_prompt: bool = True

    def key(self, seed: int) -> str:
        """A hash of what the weights depend on (diffusers' bookkeeping keys such as
        ``_use_default_values``, a list in no fixed order, left out)."""
        configs = {
            name: {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
            for name, config in self.configs.items()
        }
        described = json.dumps(
            {"configs": configs, "seed": seed, "init": INIT_VERSION}, sort_keys=True, default=str
        )
        return hashlib.sha256(described.encode()).hexdigest()[:16]


def shipped_shape() -> SDXLShape:
    """SDXL base 1.0's configs, as shipped in ``basemodel/configs/sdxl``."""
    from basemodel.families import read_index, read_json
    from basemodel.single_file import SDXL_CONFIG_DIR, load_tokenizer

    folder = SDXL_CONFIG_DIR
    configs = {name: read_json(folder / name / "config.json") for name in ("unet", "vae", *TEXT_ENCODERS)}
    configs["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")

    def tokenizers() -> tuple[Any, Any]:
        return load_tokenizer(folder / "tokenizer"), load_tokenizer(folder / "tokenizer_2")

    force_zeros = bool(read_index(folder).get("force_zeros_for_empty_prompt", True))
    return SDXLShape("sdxl", configs, tokenizers, force_zeros)


def tiny_shape() -> SDXLShape:
    """tiny-sdxl-random's configs and tokenizer (the shape of ``basemodel.families.sdxl.tiny``)."""
    from basemodel.families.sdxl.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    configs = {name: dict(getattr(pipe, name).config) for name in ("unet", "vae", "scheduler")}
    configs["scheduler"]["_class_name"] = type(pipe.scheduler).__name__
    for name in TEXT_ENCODERS:
        configs[name] = getattr(pipe, name).config.to_dict()
    tokenizer = pipe.tokenizer
    return SDXLShape("tiny-sdxl", configs, lambda: (tokenizer, tokenizer), True)


SHAPES: dict[str, Callable[[], SDXLShape]] = {"sdxl": shipped_shape, "tiny-sdxl": tiny_shape}


# -- building ----------------------------------------------------------------------------------------


def build_component(
    module: nn.Module,
    path: Path | None,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    *,
    cached: bool,
    cast: bool,
) -> nn.Module:
    """One component's weights made in place on its meta skeleton: read from the fp16 cache file
    ``path`` when ``cached``, else drawn from ``generator`` and rounded to what the cache stores (and
    written there). ``cast``: kept in fp16 storage and computed in ``dtype`` (the text encoders of an
    fp32 run on the CPU)."""
    storage = {id(m): STORED for m in castable(module)} if cast else {}
    materialise(module, dtype, storage)
    if cached:
        assert path is not None
        read_weights(module, path)
    else:
        initialise(module, generator)
        round_to_stored(module, path)
    if storage:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(
            module,
            storage_dtype=STORED,
            compute_dtype=dtype,
            skip_modules_pattern=skip_patterns(module),
            skip_modules_classes=(nn.Embedding,),
        )
    return module.to(device).eval()


def build_sdxl_pipeline(
    shape: SDXLShape,
    device: torch.device,
    dtype: torch.dtype,
    cache_root: Path | None,
    seed: int = 0,
    *,
    text_encoders: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """The pipeline on ``device`` in ``dtype`` (see the module docstring), and how it was made.

    ``text_encoders=False`` leaves both text encoders on the meta device (their modules and shapes are
    there for the LoRA targets and the architecture, their weights are not: 1.8 GiB less for runs that
    encode no prompt)."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline

    from basemodel.families import detect_pipeline

    folder = cache_root / f"{shape.name}-random-{shape.key(seed)}" if cache_root is not None else None
    needed = [c for c in COMPONENTS if text_encoders or c not in TEXT_ENCODERS]
    cached = folder is not None and all((folder / f"{c}.safetensors").is_file() for c in needed)
    cast_text_encoders = device.type == "cpu" and dtype == torch.float32
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, nn.Module] = {}
    for name in COMPONENTS:
        module = skeleton(name, shape.configs[name])
        if name in TEXT_ENCODERS and not text_encoders:
            modules[name] = module.eval()
            continue
        path = folder / f"{name}.safetensors" if folder is not None else None
        cast = cast_text_encoders and name in TEXT_ENCODERS
        modules[name] = build_component(module, path, dtype, device, generator, cached=cached, cast=cast)
    scheduler_config = shape.configs["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    tokenizer, tokenizer_2 = shape.tokenizers()
    pipe: Any = StableDiffusionXLPipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=shape.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    detect_pipeline(pipe).after_load(pipe)  # the time-embedding check; fp16 on CUDA: the VAE in fp32
    described = {
        "model": f"{shape.name}-random (seed {seed}, random init from configs)",
        "model_cache": str(folder) if folder is not None else None,
        "model_cache_hit": cached,
        "text_encoders_stored_as": (
            ("float16, cast to float32 per layer" if cast_text_encoders else str(dtype))
            if text_encoders
            else "not materialised (meta device: no phase of this run encodes a prompt)"
        ),
    }
    return pipe, described


def skeleton(name: str, config: dict[str, Any]) -> nn.Module:
    """The component ``name`` on the meta device (no storage, nothing initialised)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if name == "unet":
            return UNet2DConditionModel.from_config(config)
        if name == "vae":
            return AutoencoderKL.from_config(config)
        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return cls(CLIPTextConfig.from_dict(config))


def skip_patterns(module: nn.Module) -> tuple[str, ...]:
    """The module names ``apply_layerwise_casting`` leaves alone: its default patterns (``norm``, …) and
    the layers transformers keeps in fp32 (``_keep_in_fp32_modules``: T5's ``wo``, whose input T5 casts to
    the stored weight's dtype)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    return (*DEFAULT_SKIP_MODULES_PATTERN, *(rf"(^|\.){name}$" for name in keep))


def castable(module: nn.Module) -> Iterator[nn.Module]:
    """The layers ``apply_layerwise_casting`` will cast with ``skip_modules_classes=(nn.Embedding,)``
    and ``skip_patterns`` (Linear and Conv layers whose name matches no pattern, e.g. ``norm``)."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    patterns = skip_patterns(module)
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Embedding) or not isinstance(layer, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            continue
        if not any(re.search(pattern, name) for pattern in patterns):
            yield layer


def materialise(module: nn.Module, dtype: torch.dtype, storage: dict[int, torch.dtype]) -> None:
    """Real (uninitialised) CPU storage for every tensor: ``storage[id(layer)]`` for the layers named
    there, ``dtype`` for the rest; the non-persistent buffers the models hold are set."""
    for layer in module.modules():
        want = storage.get(id(layer), dtype)
        for name, param in layer.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != want:
                layer._parameters[name] = nn.Parameter(param.to(want), requires_grad=param.requires_grad)
    module.to_empty(device="cpu")
    set_buffers(module)


@torch.no_grad()
def set_buffers(module: nn.Module) -> None:
    """The values of the buffers the models hold: CLIP's position ids (an arange) and SD3's fixed 2-D
    sin-cos position table (``PatchEmbed.pos_embed``, as its ``__init__`` computes it); the UNets, VAEs,
    T5 and Flux's transformer hold none."""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    tables = {
        f"{name}.pos_embed": layer
        for name, layer in module.named_modules()
        if isinstance(layer, PatchEmbed) and layer.pos_embed is not None
    }
    for name, buffer in module.named_buffers():
        if name.endswith("embeddings.position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        elif name in tables:
            patch = tables[name]
            grid = math.isqrt(buffer.shape[1])
            table = get_2d_sincos_pos_embed(
                buffer.shape[-1],
                grid,
                base_size=patch.base_size,
                interpolation_scale=patch.interpolation_scale,
                output_type="pt",
            )
            buffer.copy_(table.float().unsqueeze(0))
        else:
            raise RuntimeError(f"unexpected buffer {name} in {type(module).__name__}: set it here")


@torch.no_grad()
def initialise(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default init of every layer, in place, drawn from ``generator`` in module order: Linear
    and Conv weights and biases U(±1/√fan_in) (what ``kaiming_uniform_(a=√5)`` and the bias init of
    ``reset_parameters`` give), norms 1 and 0, embeddings N(0, 1)."""
    for name, layer in module.named_modules():
        weight: Any = getattr(layer, "weight", None)
        bias: Any = getattr(layer, "bias", None)
        if isinstance(layer, nn.Linear | nn.Conv2d):
            bound = 1.0 / math.sqrt(weight[0].numel())
            weight.uniform_(-bound, bound, generator=generator)
            if bias is not None:
                bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(layer, nn.LayerNorm | nn.GroupNorm):
            if weight is not None:
                weight.fill_(1.0)
            if bias is not None:
                bias.zero_()
        elif isinstance(layer, nn.Embedding):
            weight.normal_(0.0, 1.0, generator=generator)
        elif type(layer).__name__ in RMS_NORMS:
            weight.fill_(1.0)
            if bias is not None:
                bias.zero_()
        elif list(layer.parameters(recurse=False)):
            raise RuntimeError(f"{name}: no init for {type(layer).__name__}; add it here")
    for key, tensor in module.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise RuntimeError(f"{key} is not finite after init")


# -- the fp16 cache: safetensors, written and read one tensor at a time -----------------------------------


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor (parameters and persistent buffers), sorted by name."""
    return dict(sorted(module.state_dict().items()))


def header(named: dict[str, torch.Tensor]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt", "init_version": str(INIT_VERSION)}}
    offset = 0
    for name, tensor in named.items():
        size = tensor.numel() * STORED.itemsize
        entries[name] = {
            "dtype": ST_DTYPE,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


@torch.no_grad()
def round_to_stored(module: nn.Module, path: Path | None) -> None:
    """Round every tensor to fp16 in place; with a ``path``, also write them there (atomically)."""
    named = tensors(module)
    out = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        out = staging.open("wb")
        head = header(named)
        out.write(struct.pack("<Q", len(head)) + head)
    try:
        for tensor in named.values():
            stored = tensor.to(STORED)
            tensor.copy_(stored)
            if out is not None:
                out.write(stored.contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        if out is not None:
            out.close()
    if path is not None:
        os.replace(staging, path)


@torch.no_grad()
def read_weights(module: nn.Module, path: Path) -> None:
    """Fill ``module`` from a cache file ``round_to_stored`` wrote: every name, shape and offset must be
    the module's (a stale or foreign file is refused), values converted to each tensor's dtype."""
    named = tensors(module)
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 64 << 20:
            raise ValueError(f"{path}: header of {length} bytes")
        entries = json.loads(handle.read(length))
        entries.pop("__metadata__", None)
        expected = json.loads(header(named).rstrip())
        expected.pop("__metadata__")
        if entries != expected:
            raise ValueError(f"{path} does not hold this model's tensors; delete it to rebuild the cache")
        for tensor in named.values():
            size = tensor.numel() * STORED.itemsize
            data = bytearray(size)
            if handle.readinto(data) != size:
                raise ValueError(f"{path} is truncated")
            tensor.copy_(torch.frombuffer(data, dtype=STORED).view(tensor.shape))
        if hasattr(os, "posix_fadvise"):  # the file is read once: leave the page cache to others
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
