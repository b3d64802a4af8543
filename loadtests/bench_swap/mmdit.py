"""The MMDiT shapes: Flux.1-dev- and SD3.5-medium-shaped random pipelines, built in place from configs.

``flux`` takes Flux.1-dev's transformer config (``basemodel/configs/flux1-dev``: 3072 wide, 24 heads of
128, ``joint_attention_dim`` 4096, pooled 768, 64 input channels, the guidance embedding) with
**2 double-stream and 4 single-stream blocks** instead of 19 + 38 (``FLUX_BLOCKS``; every module a LoRA
targets has Flux-dev's shape, only fewer of them), Flux's VAE (16 latent channels), CLIP-L (the SD1.5
text-encoder config: its pooled output is Flux's pooled projection) and a T5 encoder of T5-XXL's width
(4096, 64 heads, d_ff 10240) with one layer instead of 24 and the offline Unigram tokenizer's vocabulary
(no LoRA touches T5; it only makes the 512-token context the transformer attends to).

``sd3`` takes SD3.5 medium's transformer config (``basemodel/configs/sd35-medium``: 24 joint blocks,
1536 wide, 24 heads of 64, dual attention in blocks 0-12, RMS QK norm, 2.2 B parameters) at full
depth, the SD3 VAE, CLIP-L and CLIP-G (``sdxl/text_encoder_2``) with projections, and the same
one-layer T5.

``tiny-flux`` and ``tiny-sd3`` are tiny-flux-random's and tiny-sd3-random's shapes through the same
code, for the tests and ``bench_gpu --dry`` (seconds).

The weights are made as for the SDXL shape (``sdxl.py``: meta skeletons, storage in the run dtype, PyTorch's
default init drawn in place from one seeded generator, rounded to fp16, cached tensor by tensor under
``<cache>/<shape>-random-<key>/``); text encoders on a CPU are stored in fp16 and cast per layer, or
left on the meta device when no phase encodes a prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .sdxl import (
    INIT_VERSION,
    build_component,
)

FLUX_BLOCKS = {"num_layers": 2, "num_single_layers": 4}  # Flux.1-dev: 19 double + 38 single
T5_DEPTH = {"num_layers": 1}  # T5-XXL: 24 (the encoder's depth; width, heads and d_ff are T5-XXL's)


@dataclass(frozen=True)
class MMDiTShape:
    """What a random MMDiT pipeline is built from: the pipeline class, component configs and classes
    (built in the order of ``classes``, from one generator) and the tokenizers."""

    name: str
    pipeline: str  # diffusers pipeline class
    configs: dict[str, dict[str, Any]]  # per component, plus "scheduler"
    classes: dict[str, str]  # component → class name (diffusers or transformers)
    tokenizers: Callable[[], dict[str, Any]]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.classes)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c.startswith("text_encoder"))

    def key(self, seed: int) -> str:
        """A hash of what the weights depend on (diffusers' bookkeeping keys left out)."""
        configs = {
            name: {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
            for name, config in self.configs.items()
        }
        described = json.dumps(
            {"configs": configs, "classes": self.classes, "seed": seed, "init": INIT_VERSION},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(described.encode()).hexdigest()[:16]


def _configs(folder: Path, *names: str) -> dict[str, dict[str, Any]]:
    from basemodel.families import read_json

    found = {name: read_json(folder / name / "config.json") for name in names}
    found["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")
    return found


def _t5(t5_folder: Path, tokenizer: Any) -> dict[str, Any]:
    from basemodel.families import read_json

    return {**read_json(t5_folder / "config.json"), **T5_DEPTH, "vocab_size": len(tokenizer)}


def flux_shape() -> MMDiTShape:
    from basemodel.families.t5 import build_t5_tokenizer
    from basemodel.single_file_parts import CONFIGS_DIR, SD15_CONFIG_DIR, load_tokenizer

    folder = CONFIGS_DIR / "flux1-dev"
    configs = _configs(folder, "transformer", "vae")
    configs["transformer"].update(FLUX_BLOCKS)
    configs["text_encoder"] = _configs(SD15_CONFIG_DIR, "text_encoder")["text_encoder"]
    configs["text_encoder_2"] = _t5(folder / "text_encoder_2", build_t5_tokenizer())

    def tokenizers() -> dict[str, Any]:
        return {
            "tokenizer": load_tokenizer(SD15_CONFIG_DIR / "tokenizer"),
            "tokenizer_2": build_t5_tokenizer(),
        }

    classes = {
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
        "vae": "AutoencoderKL",
        "transformer": "FluxTransformer2DModel",
    }
    return MMDiTShape("flux", "FluxPipeline", configs, classes, tokenizers)


def sd3_shape() -> MMDiTShape:
    from basemodel.families.t5 import build_t5_tokenizer
    from basemodel.single_file_parts import CONFIGS_DIR, SD15_CONFIG_DIR, SDXL_CONFIG_DIR, load_tokenizer

    configs = _configs(CONFIGS_DIR / "sd35-medium", "transformer", "vae")
    configs["text_encoder"] = _configs(SD15_CONFIG_DIR, "text_encoder")["text_encoder"]
    configs["text_encoder_2"] = _configs(SDXL_CONFIG_DIR, "text_encoder_2")["text_encoder_2"]
    configs["text_encoder_3"] = _t5(CONFIGS_DIR / "flux1-dev" / "text_encoder_2", build_t5_tokenizer())

    def tokenizers() -> dict[str, Any]:
        return {
            "tokenizer": load_tokenizer(SD15_CONFIG_DIR / "tokenizer"),
            "tokenizer_2": load_tokenizer(SDXL_CONFIG_DIR / "tokenizer_2"),
            "tokenizer_3": build_t5_tokenizer(),
        }

    classes = {
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
        "vae": "AutoencoderKL",
        "transformer": "SD3Transformer2DModel",
    }
    return MMDiTShape("sd3", "StableDiffusion3Pipeline", configs, classes, tokenizers)


def _tiny(name: str, pipe: Any) -> MMDiTShape:
    """A tiny pipeline's shape: its components' configs and classes, its tokenizers."""
    classes: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    for component, module in pipe.components.items():
        if isinstance(module, nn.Module):
            classes[component] = type(module).__name__
            config: Any = module.config
            configs[component] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    configs["scheduler"] = dict(pipe.scheduler.config) | {"_class_name": type(pipe.scheduler).__name__}
    tokenizers = {k: v for k, v in pipe.components.items() if k.startswith("tokenizer")}
    return MMDiTShape(name, type(pipe).__name__, configs, classes, lambda: dict(tokenizers))


def tiny_flux_shape() -> MMDiTShape:
    from basemodel.families.flux.tiny import build_tiny_flux_pipeline

    return _tiny("tiny-flux", build_tiny_flux_pipeline())


def tiny_sd3_shape() -> MMDiTShape:
    from basemodel.families.sd3.tiny import build_tiny_sd3_pipeline

    return _tiny("tiny-sd3", build_tiny_sd3_pipeline())


SHAPES: dict[str, Callable[[], MMDiTShape]] = {
    "flux": flux_shape,
    "sd3": sd3_shape,
    "tiny-flux": tiny_flux_shape,
    "tiny-sd3": tiny_sd3_shape,
}


# -- building ----------------------------------------------------------------------------------------


def build_mmdit_pipeline(
    shape: MMDiTShape,
    device: torch.device,
    dtype: torch.dtype,
    cache_root: Path | None,
    seed: int = 0,
    *,
    text_encoders: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """The pipeline on ``device`` in ``dtype`` and how it was made (see the module docstring);
    ``text_encoders=False`` leaves the text encoders on the meta device."""
    import diffusers

    from basemodel.families import detect_pipeline

    folder = cache_root / f"{shape.name}-random-{shape.key(seed)}" if cache_root is not None else None
    needed = [c for c in shape.components if text_encoders or c not in shape.text_encoders]
    cached = folder is not None and all((folder / f"{c}.safetensors").is_file() for c in needed)
    cast_text_encoders = device.type == "cpu" and dtype == torch.float32
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, nn.Module] = {}
    for name in shape.components:
        module = skeleton(shape.classes[name], shape.configs[name])
        if name in shape.text_encoders and not text_encoders:
            modules[name] = module.eval()
            continue
        cast = cast_text_encoders and name in shape.text_encoders
        path = folder / f"{name}.safetensors" if folder is not None else None
        modules[name] = build_component(module, path, dtype, device, generator, cached=cached, cast=cast)
    scheduler_config = shape.configs["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe: Any = getattr(diffusers, shape.pipeline)(**modules, **shape.tokenizers(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    detect_pipeline(pipe).after_load(pipe)
    described = {
        "model": f"{shape.name}-random (seed {seed}, random init from configs)",
        "model_cache": str(folder) if folder is not None else None,
        "model_cache_hit": cached,
        "transformer_config": {
            k: v for k, v in shape.configs["transformer"].items() if not str(k).startswith("_")
        },
        "text_encoders_stored_as": (
            ("float16, cast to float32 per layer" if cast_text_encoders else str(dtype))
            if text_encoders
            else "not materialised (meta device: no phase of this run encodes a prompt)"
        ),
    }
    return pipe, described


def skeleton(class_name: str, config: dict[str, Any]) -> nn.Module:
    """The component on the meta device (no storage, nothing initialised)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if hasattr(diffusers, class_name) and not hasattr(transformers, class_name):
            model: nn.Module = getattr(diffusers, class_name).from_config(config)
            return model
        cls: Any = getattr(transformers, class_name)
        config_cls = cls.config_class
        return cls(config_cls.from_dict(config))
