"""Model families — ``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux`` — one module or package each, and
the registry that detects them.

A family is detected from the model, never from its file name: for a diffusers folder from
``model_index.json``'s ``_class_name`` (checked against the denoiser's config: ``addition_embed_type ==
"text_time"`` for SDXL, ``cross_attention_dim`` 1024 for SD2.x, ``joint_attention_dim`` for SD3,
``guidance_embeds`` telling Flux-dev from schnell) and for a single-file checkpoint from its keys
(``conditioner.embedders.1.`` → SDXL, OpenCLIP ``cond_stage_model.model.`` → SD2.x,
``cond_stage_model.transformer.`` → SD1.x, each beside ``model.diffusion_model.``; SAI's
``joint_blocks.0.context_block.…`` → SD3, BFL's ``double_blocks.0.img_attn.norm.key_norm.scale`` → Flux,
bare or under ``model.diffusion_model.``).

Adding a family (Flux.2, Qwen-Image …) means adding a module with a ``ModelFamily`` subclass and
listing it in ``FAMILIES``; detection asks the families in that order and the first that claims a
model wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from basemodel.errors import BaseModelError
from basemodel.families.base import ModelFamily
from basemodel.families.flux import Flux
from basemodel.families.sd1 import SD1
from basemodel.families.sd2 import SD2
from basemodel.families.sd3 import SD3
from basemodel.families.sdxl import SDXL
from basemodel.families.values import Conditioning, DenoiserCall, DenoiserInputs, ModelSignals, UNetInputs

__all__ = [
    "FAMILIES",
    "Conditioning",
    "DenoiserCall",
    "DenoiserInputs",
    "ModelFamily",
    "ModelSignals",
    "UNetInputs",
    "declared_by",
    "detect",
    "detect_checkpoint",
    "detect_folder",
    "detect_pipeline",
    "find_family",
    "get_family",
    "kohya_components",
    "label_of",
    "lora_components",
    "owners_of",
]

# Detection order: the more specific claim first (SD2.x is SD1.x's pipeline with a wider context; SD1.x
# claims any UNet without added conditioning, so the transformer families come before it). Where several
# families own a component (``text_encoder_2``: SDXL, SD3), messages name them in this order.
FAMILIES: tuple[ModelFamily, ...] = (SDXL(), SD3(), Flux(), SD2(), SD1())
_BY_NAME = {family.name: family for family in FAMILIES}


def names() -> list[str]:
    return [family.name for family in FAMILIES]


def find_family(name: str | None) -> ModelFamily | None:
    """The family called ``name``; None for None or a name recorded by something else."""
    return _BY_NAME.get(name or "")


def get_family(name: str) -> ModelFamily:
    family = find_family(name)
    if family is None:
        raise BaseModelError(
            f"unknown model family {name!r}",
            detail={"family": name, "known": names()},
            hint=f"Known families: {', '.join(names())}.",
        )
    return family


def detect(signals: ModelSignals, where: str = "the model") -> ModelFamily:
    """The family that claims ``signals``; an unknown pipeline or a contradiction is a BaseModelError."""
    for family in FAMILIES:
        if not family.claims(signals):
            continue
        problems = family.problems(signals)
        if problems:
            raise BaseModelError(
                f"{where} names {signals.pipeline_class or 'no pipeline'} ({family.label}), "
                f"but {'; '.join(problems)}",
                detail={"family": family.name, "problems": problems},
                hint="The folder's model_index.json and component configs do not belong together.",
            )
        return family
    supported = ", ".join(f"{f.label} ({f.pipeline_classes[0]})" for f in reversed(FAMILIES))
    raise BaseModelError(
        f"{where} is a {signals.pipeline_class or 'pipeline'} of no supported model family",
        detail={"pipeline_class": signals.pipeline_class, "supported": names()},
        hint=f"Supported: {supported}.",
    )


def denoiser_names() -> tuple[str, ...]:
    """Every component name a family's denoiser has (``unet``, ``transformer``)."""
    return tuple(dict.fromkeys(family.denoiser for family in FAMILIES))


def lora_components() -> tuple[str, ...]:
    """Every component name a LoRA key may start with, over all families: the denoisers, then the
    text encoders (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``)."""
    encoders = (name for family in FAMILIES for name in family.text_encoders)
    return tuple(dict.fromkeys((*denoiser_names(), *sorted(encoders))))


def detect_folder(path: Path) -> ModelFamily:
    """The family of a diffusers folder, from ``model_index.json`` and the denoiser's config
    (``unet/config.json`` or ``transformer/config.json``)."""
    index = read_index(path)
    denoiser = next((name for name in denoiser_names() if (path / name / "config.json").is_file()), "unet")
    signals = ModelSignals(
        pipeline_class=str(index.get("_class_name")),
        denoiser=read_json(path / denoiser / "config.json"),
        components={
            name: (str(value[0]), str(value[1]))
            for name, value in index.items()
            if isinstance(value, list) and len(value) == 2 and value[0] is not None
        },
    )
    return detect(signals, where=f"{path.name}/model_index.json")


def detect_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline (its class and denoiser config)."""
    components = {
        name: (type(module).__module__.split(".")[0], type(module).__name__)
        for name, module in pipe.components.items()
        if module is not None
    }
    denoiser = next(
        (pipe.components[n] for n in denoiser_names() if pipe.components.get(n) is not None), None
    )
    config = dict(denoiser.config) if denoiser is not None else {}
    return detect(ModelSignals(type(pipe).__name__, config, components))


def detect_checkpoint(keys: Iterable[str]) -> ModelFamily | None:
    """The family of a single-file checkpoint (LDM/SGM, SAI or BFL layout) from its keys; None when
    none matches."""
    names = set(keys)
    return next((family for family in FAMILIES if family.claims_checkpoint(names)), None)


def kohya_components() -> dict[str, str]:
    """Every kohya key prefix any family writes → the component it names (``lora_te_`` and
    ``lora_te1_`` → ``text_encoder``, ``lora_te2_`` → ``text_encoder_2``). Readers accept them all:
    a prefix means the same component in every family, and a component the base lacks is refused."""
    prefixes: dict[str, str] = {}
    for family in FAMILIES:
        for prefix, component in family.kohya_prefixes.items():
            if prefixes.setdefault(prefix, component) != component:
                raise AssertionError(f"kohya prefix {prefix} names two components")
    return prefixes


def owners_of(component: str) -> list[ModelFamily]:
    """The families whose LoRA components include ``component`` (``text_encoder_2``: SDXL, SD3)."""
    return [family for family in FAMILIES if component in (family.denoiser, *family.text_encoders)]


PREDICTION_TYPES = ("epsilon", "v_prediction")


def declared_by(header: Mapping[str, str]) -> tuple[ModelFamily, str] | None:
    """The family an adapter file's header declares through the names other tools write
    (``modelspec.architecture``, then kohya's ``ss_base_model_version``), with the key that said so;
    None when it declares none this registry knows."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = header.get(key)
        for family in FAMILIES:
            if value and value in _interop_names(family, key):
                return family, f"{key} {value!r}"
    return None


def _interop_names(family: ModelFamily, key: str) -> set[str]:
    if key == "modelspec.architecture":
        names = {family.modelspec_architecture(p) for p in PREDICTION_TYPES}
    else:
        names = {family.kohya_base_version(p) for p in PREDICTION_TYPES}
    return names | family.interop_aliases(key)


def label_of(name: str | None) -> str:
    """A family name for messages: 'SDXL (sdxl)'; names no family here knows are shown as given."""
    family = find_family(name)
    if family is None:
        return f"{name!r}" if name else "an unknown family"
    return f"{family.label} ({family.name})"


def read_index(path: Path) -> dict[str, Any]:
    return read_json(path / "model_index.json")


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read model config {file}: {exc}", detail={"path": str(file)}) from exc
    if not isinstance(data, dict):
        raise BaseModelError(f"model config {file} is not a JSON object", detail={"path": str(file)})
    return data
