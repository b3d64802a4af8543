"""Base-model identity: a content fingerprint and an architecture descriptor.

* ``fingerprint``: sha256 over the weight files. For a single-file checkpoint it is the plain
  sha256 of the file (what A1111 and kohya's ``ss_new_sd_model_hash`` record); for a diffusers
  folder it is sha256 over ``relative path\\0sha256(file)\\n`` for every ``*.safetensors`` weight
  file, sorted by path. Computed once and cached beside the model, keyed by size and mtime.
* ``architecture``: the model family and every LoRA-targetable module (``nn.Linear`` / ``nn.Conv2d``)
  of the UNet and the text encoder(s), as ``"unet.<path>"`` / ``"text_encoder.<path>"`` /
  ``"text_encoder_2.<path>"`` → weight shape, plus its own sha256 (``architecture_id``, over the family
  and the modules) so two models can be compared in O(1). It also keeps the denoiser's config
  (``unet_config``, public keys only: the UNet's or the transformer's), from which ``adapters.kohya_ldm``
  derives the LDM/SGM names of a UNet's modules and the transformer families their community LoRA
  tables (``ModelFamily.lora_layout``); the config is not part of ``architecture_id`` nor of equality.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

CACHE_NAME = ".loraswap-fingerprint.json"
# Families whose ids predate families: StableDiffusionPipeline folders (SD1.x, SD2.x) loaded before the
# family was part of the id, so their ids stay module-only and stored adapters keep opening. Their
# modules already tell them apart (cross-attention width 1024 is what makes a model SD2.x).
LEGACY_ID_FAMILIES = frozenset({"sd1", "sd2"})
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(model_path: Path) -> list[Path]:
    if model_path.is_file():
        return [model_path]
    return sorted(p for p in model_path.rglob("*.safetensors") if p.is_file())


def _stamp(files: list[Path]) -> list[list[Any]]:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _cache_path(model_path: Path) -> Path:
    if model_path.is_file():
        return model_path.with_name(model_path.name + ".loraswap.json")
    return model_path / CACHE_NAME


def fingerprint(model_path: Path) -> str:
    """sha256 identity of a base model's weights (cached; recomputed when a file changes)."""
    model_path = Path(model_path).resolve()
    files = _weight_files(model_path)
    if not files:
        raise FileNotFoundError(f"no .safetensors weights under {model_path}")
    stamp = _stamp(files)
    cache = _cache_path(model_path)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    if model_path.is_file():
        value = sha256_file(model_path)
    else:
        manifest = hashlib.sha256()
        for path in files:
            manifest.update(f"{path.relative_to(model_path).as_posix()}\0{sha256_file(path)}\n".encode())
        value = manifest.hexdigest()
    with contextlib.suppress(OSError):  # read-only model folder: correct, just not cached
        cache.write_text(json.dumps({"sha256": value, "stamp": stamp}))
    return value


@dataclass(frozen=True)
class Architecture:
    """LoRA-targetable modules of a base model and their weight shapes."""

    modules: dict[str, tuple[int, ...]] = field(repr=False)
    family: str = "sd1"
    unet_config: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def architecture_id(self) -> str:
        """(Computed once: every adapter open checks it.) sha256 over the family and the modules;
        SD1.x/SD2.x ids hash the modules alone (see
        ``LEGACY_ID_FAMILIES``), so any other family's id differs from theirs even for equal modules."""
        modules = sorted((k, list(v)) for k, v in self.modules.items())
        content: Any = (
            modules if self.family in LEGACY_ID_FAMILIES else {"family": self.family, "modules": modules}
        )
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def shape_of(self, module: str) -> tuple[int, ...] | None:
        return self.modules.get(module)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "family": self.family,
            "architecture_id": self.architecture_id,
            "modules": {k: list(v) for k, v in self.modules.items()},
        }
        if self.unet_config is not None:
            data["unet_config"] = self.unet_config
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        config = data.get("unet_config")
        return cls(
            modules={k: tuple(v) for k, v in data["modules"].items()},
            family=str(data.get("family", "sd1")),
            unet_config=public_config(config) if isinstance(config, Mapping) else None,
        )


TARGETABLE = (nn.Linear, nn.Conv2d)


def describe_modules(prefix: str, model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.{name}": tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, TARGETABLE)
    }


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as plain JSON-ready data, without its private ``_…`` keys."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not str(k).startswith("_")
    }


DENOISERS = ("unet", "transformer")


def architecture_of(components: Mapping[str, nn.Module], family: str) -> Architecture:
    """The descriptor of ``components`` (name → module, e.g. ``unet``, ``text_encoder``); the denoiser's
    config (the ``unet``'s or the ``transformer``'s) comes along when it has one (diffusers models do)."""
    modules: dict[str, tuple[int, ...]] = {}
    for prefix, model in components.items():
        modules |= describe_modules(prefix, model)
    denoiser = next((components[name] for name in DENOISERS if name in components), None)
    config = getattr(denoiser, "config", None)
    unet_config = public_config(config) if isinstance(config, Mapping) else None
    return Architecture(modules=modules, family=family, unet_config=unet_config)
