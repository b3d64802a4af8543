"""What the transformer (MMDiT) families' single-file loaders share: SD3/SD3.5 and Flux.1 checkpoints as
SAI, BFL and ComfyUI write them, converted with diffusers' converters and completed from a diffusers
folder (``--base-components``) the way ``FluxPipeline.from_pretrained(folder, transformer=...)`` does.

A family module (``basemodel.families.flux.single_file``, ``basemodel.families.sd3.single_file``)
describes its file layout as a ``TransformerLayout`` and calls ``load_transformer_file``, which:

1. reads the tensors of the components the file holds (the transformer under ``model.diffusion_model.``
   or bare; ``text_encoders.clip_l/clip_g/t5xxl.transformer.``; the VAE under ``vae.`` or
   ``first_stage_model.``), refusing scaled-fp8 files whose weights need their scales;
2. converts the transformer and builds it with the first config whose shapes fit: the components
   folder's ``transformer/config.json`` (after ``adjust``: Flux's ``guidance_embeds`` from the keys),
   then the shipped config of the variant the keys name (``basemodel/configs``);
3. builds the VAE and text encoders the file holds (configs: the folder's, else the shipped ones);
4. takes the scheduler from the shipped config of the variant (schnell's is not dev's), the tokenizers
   and whatever weights the file lacks from the components folder; without one, a file that lacks a
   component is a ``MissingComponents`` error that names them and says how to supply them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from basemodel.errors import BaseModelError, MissingComponents
from basemodel.families import FAMILIES, read_index, read_json
from basemodel.single_file_parts import CONFIGS_DIR, assign_weights, converted, load_scheduler, load_tokenizer

COMPONENTS_FLAG = "--base-components"
COMPONENTS_ENV = "LORASWAP_BASE_COMPONENTS"
COMFY_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("vae.", "first_stage_model.")


@dataclass(frozen=True)
class Encoder:
    """A text encoder a file may hold: its pipeline name, key prefix, class and shipped config."""

    name: str
    words: str
    prefix: str
    # "clip" (CLIPTextModel), "clip_projection" (CLIPTextModelWithProjection, the file's projection),
    # "clip_identity" (the same with the identity projection: SD3's CLIP-L, as diffusers' converter
    # builds it — SD3 uses its pooled output unprojected) or "t5"
    kind: str
    config: str  # shipped config folder, relative to basemodel/configs
    tokenizer: str  # its tokenizer's pipeline name
    # the shipped tokenizer settings (CLIP's vocabulary is vendored); None: only a folder has it (T5)
    tokenizer_config: str | None = None


@dataclass(frozen=True)
class TransformerLayout:
    """One family's single-file layout and the variant the keys name."""

    label: str  # "Flux.1-dev"
    family: str  # registry name: "flux", "sd3"
    pipeline_class: type[Any]
    transformer_class: type[Any]
    convert: Callable[[dict[str, torch.Tensor], Mapping[str, Any]], dict[str, torch.Tensor]]
    transformer_config: str  # shipped, relative to basemodel/configs
    scheduler_config: str
    vae_config: str
    encoders: tuple[Encoder, ...]
    # components the pipeline may go without when neither the file nor a folder has them (SD3's T5)
    optional: frozenset[str] = frozenset()
    adjust: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda config: config)

    def components(self) -> list[str]:
        names = ["transformer", "scheduler", "vae"]
        for encoder in self.encoders:
            names += [encoder.name, encoder.tokenizer]
        return names


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name → shape, without reading the tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (a handle, not a dict)


def read_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in keys}


def refuse_scaled_fp8(path: Path, keys: Iterable[str]) -> None:
    scaled = [key for key in keys if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input"))]
    if scaled:
        raise BaseModelError(
            f"{path.name} is a scaled-fp8 checkpoint ({scaled[0]}): its fp8 weights only mean something "
            "with their per-tensor scales, which diffusers' converters do not apply",
            detail={"path": str(path), "detected": "scaled fp8"},
            hint="Use the bf16/fp16 release of the model (or an unscaled fp8 file).",
        )


def transformer_keys(keys: Iterable[str], layout_prefixes: tuple[str, ...]) -> tuple[str, list[str]]:
    """(the transformer's prefix, its keys): ComfyUI/SAI's ``model.diffusion_model.`` or BFL's bare
    names (every key that is no other component's)."""
    keys = list(keys)
    if any(key.startswith(COMFY_PREFIX) for key in keys):
        return COMFY_PREFIX, [key for key in keys if key.startswith(COMFY_PREFIX)]
    return "", [key for key in keys if not key.startswith(layout_prefixes)]


def load_transformer_file(
    path: Path,
    layout: TransformerLayout,
    header: Mapping[str, tuple[int, ...]],
    torch_dtype: torch.dtype,
    components: Path | None,
) -> Any:
    """The family's pipeline from ``path`` (see the module doc), completed from ``components``."""
    refuse_scaled_fp8(path, header)
    folder = _components_folder(components, layout)
    vae_prefix = next((p for p in VAE_PREFIXES if any(key.startswith(p) for key in header)), None)
    encoders = [e for e in layout.encoders if any(key.startswith(e.prefix) for key in header)]
    if folder is None:  # before reading gigabytes: is anything missing that only a folder can give?
        _check_complete(path, layout, vae_prefix is not None, encoders)
    other = (*VAE_PREFIXES, *(encoder.prefix for encoder in layout.encoders), "text_encoders.")
    prefix, keys = transformer_keys(header, other)
    have: dict[str, Any] = {
        "transformer": _transformer(path, layout, read_tensors(path, keys), prefix, folder, torch_dtype),
        "scheduler": load_scheduler(CONFIGS_DIR / layout.scheduler_config / "scheduler_config.json"),
    }
    if vae_prefix is not None:
        have["vae"] = _vae(path, layout, vae_prefix, header, folder, torch_dtype)
    for encoder in encoders:
        have[encoder.name] = _text_encoder(path, encoder, header, folder, torch_dtype)
    if folder is not None:
        return _from_folder(path, layout, have, folder, torch_dtype)
    for encoder in layout.encoders:
        if encoder.tokenizer_config is not None:
            have[encoder.tokenizer] = load_tokenizer(CONFIGS_DIR / encoder.tokenizer_config)
    return layout.pipeline_class(**have, **{name: None for name in layout.optional if name not in have})


def _check_complete(path: Path, layout: TransformerLayout, vae: bool, encoders: list[Encoder]) -> None:
    """Without a components folder, the file must hold every weight and every tokenizer must be
    vendored; an optional group (SD3's T5 and its tokenizer) may be absent as a whole."""
    have = {"transformer", "scheduler", *(["vae"] if vae else [])}
    have |= {encoder.name for encoder in encoders}
    have |= {encoder.tokenizer for encoder in layout.encoders if encoder.tokenizer_config is not None}
    dropped = layout.optional if not layout.optional & have else frozenset()
    missing = [name for name in layout.components() if name not in have and name not in dropped]
    if missing:
        raise missing_components(path, layout, have, missing)


def _components_folder(components: Path | None, layout: TransformerLayout) -> Path | None:
    if components is None:
        return None
    folder = Path(components).expanduser()
    if not (folder / "model_index.json").is_file():
        raise BaseModelError(
            f"the components folder {folder} is not a diffusers folder (no model_index.json)",
            detail={"components": str(folder)},
            hint=f"{COMPONENTS_FLAG} names a local diffusers folder of the same family "
            f"({layout.label}'s), e.g. one saved with save_pretrained or downloaded from the Hub.",
        )
    # by model_index.json's pipeline class alone: the folder may lack the transformer (the file has it)
    pipeline = str(read_index(folder).get("_class_name"))
    family = next((f for f in FAMILIES if pipeline in f.pipeline_classes), None)
    if family is None or family.name != layout.family:
        found = f"a {family.label} model" if family is not None else f"a {pipeline}"
        raise BaseModelError(
            f"the components folder {folder} holds {found}; the checkpoint is {layout.label}",
            detail={"components": str(folder), "pipeline_class": pipeline, "family": layout.family},
            hint=f"Pass a diffusers folder of the checkpoint's family to {COMPONENTS_FLAG}.",
        )
    return folder


def _transformer(
    path: Path,
    layout: TransformerLayout,
    state: dict[str, torch.Tensor],
    prefix: str,
    folder: Path | None,
    torch_dtype: torch.dtype,
) -> Any:
    shipped = read_json(CONFIGS_DIR / layout.transformer_config / "config.json")
    weights = converted(
        f"{layout.label} transformer",
        path,
        layout.convert,
        {k.removeprefix(prefix): v for k, v in state.items()},
        shipped,
    )
    state.clear()  # the converted tensors are what is kept
    candidates = [layout.adjust(shipped)]
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        candidates.insert(0, layout.adjust(read_json(folder / "transformer" / "config.json")))
    config = next((c for c in candidates if _fits(layout.transformer_class, c, weights)), candidates[-1])
    with init_empty_weights():
        transformer = layout.transformer_class.from_config(config)
    where = f"the shipped {layout.label} config (basemodel/configs/{layout.transformer_config})"
    if len(candidates) > 1:
        where = f"{folder}/transformer/config.json nor {where}"
    hint = (
        f"Neither {where} describes this transformer. A model of another size needs {COMPONENTS_FLAG} "
        "<folder> whose transformer/config.json describes it."
    )
    assign_weights(transformer, weights, f"{layout.label} transformer", path, torch_dtype, hint)
    return transformer


def _fits(cls: type[Any], config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether a model built from ``config`` has exactly these tensor names and shapes (on meta)."""
    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    return expected == {key: tuple(value.shape) for key, value in weights.items()}


def _config_folder(folder: Path | None, name: str, shipped: str) -> Path:
    if folder is not None and (folder / name / "config.json").is_file():
        return folder / name
    return CONFIGS_DIR / shipped


def _vae(
    path: Path,
    layout: TransformerLayout,
    prefix: str,
    header: Mapping[str, tuple[int, ...]],
    folder: Path | None,
    torch_dtype: torch.dtype,
) -> AutoencoderKL:
    config = read_json(_config_folder(folder, "vae", layout.vae_config) / "config.json")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    state = read_tensors(path, [key for key in header if key.startswith(prefix)])
    weights = converted("VAE", path, convert_ldm_vae_checkpoint, state, config)
    assign_weights(vae, weights, "VAE", path, torch_dtype)
    return vae


def _text_encoder(
    path: Path,
    encoder: Encoder,
    header: Mapping[str, tuple[int, ...]],
    folder: Path | None,
    torch_dtype: torch.dtype,
) -> torch.nn.Module:
    """CLIP (transformers' names under the prefix; ``clip_identity``: the identity projection, whatever
    the file holds) or T5 (``shared`` is also the encoder's token embedding)."""
    config = read_json(_config_folder(folder, encoder.name, encoder.config) / "config.json")
    state = {
        key.removeprefix(encoder.prefix): tensor
        for key, tensor in read_tensors(path, [k for k in header if k.startswith(encoder.prefix)]).items()
    }
    model: torch.nn.Module
    if encoder.kind == "t5":
        with init_empty_weights():
            model = T5EncoderModel(T5Config.from_dict(config))
        if "shared.weight" in state:  # ComfyUI stores the tied embedding once
            state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    else:
        cls = CLIPTextModel if encoder.kind == "clip" else CLIPTextModelWithProjection
        with init_empty_weights():
            model = cls(CLIPTextConfig.from_dict(config))
        state = _clip_names(state, model, identity=encoder.kind == "clip_identity")
    assign_weights(model, state, encoder.words, path, torch_dtype)
    return model


def _clip_names(
    state: dict[str, torch.Tensor], model: torch.nn.Module, *, identity: bool
) -> dict[str, torch.Tensor]:
    """transformers' names for this model: ``text_model.`` added or removed as the model nests, position
    ids (a buffer) left out, and a projection the model does not have (ComfyUI writes one for every CLIP,
    Flux's CLIP-L has none) or must not use (``identity``: SD3's CLIP-L gets the identity) dropped."""
    nested = hasattr(model, "text_model")
    keep_projection = hasattr(model, "text_projection") and not identity
    names: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        bare = key.removeprefix("text_model.")
        top = bare.startswith("text_projection.")
        if key.endswith("position_ids") or key == "logit_scale" or (top and not keep_projection):
            continue
        names[f"text_model.{bare}" if nested and not top else bare] = tensor
    if identity:
        config: Any = model.config
        names["text_projection.weight"] = torch.eye(int(config.projection_dim), int(config.hidden_size))
    return names


def _from_folder(
    path: Path, layout: TransformerLayout, have: dict[str, Any], folder: Path, torch_dtype: torch.dtype
) -> Any:
    """The pipeline from ``have`` and the rest from the components folder: diffusers'
    ``from_pretrained`` with the built components passed in."""
    try:
        return layout.pipeline_class.from_pretrained(
            folder, **have, dtype=torch_dtype, local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BaseModelError(
            f"cannot load the components {path.name} lacks from {folder}: {exc}",
            detail={"path": str(path), "components": str(folder)},
            hint=f"{COMPONENTS_FLAG} must be a complete diffusers {layout.label} folder (weights in "
            ".safetensors) for every component the checkpoint does not hold.",
        ) from exc


def missing_components(
    path: Path, layout: TransformerLayout, have: set[str], missing: list[str]
) -> MissingComponents:
    found = [
        name for name in layout.components() if name in have and "token" not in name and name != "scheduler"
    ]
    tokenizers_only = all("token" in name for name in missing)
    why = (
        " Tokenizers are never stored in checkpoints and T5's SentencePiece vocabulary is not shipped with "
        "loraswap, so even an all-in-one file needs a folder for it."
        if tokenizers_only
        else ""
    )
    return MissingComponents(
        f"{path.name} ({layout.label}) holds {', '.join(found)} but not {', '.join(missing)}",
        detail={"path": str(path), "family": layout.family, "found": found, "missing": missing},
        hint=f"Name a local diffusers {layout.label} folder with {COMPONENTS_FLAG} <folder> (or "
        f"{COMPONENTS_ENV}=<folder>); it supplies {', '.join(missing)} and the checkpoint the rest, as "
        f"{layout.pipeline_class.__name__}.from_pretrained(folder, transformer=...) does.{why}",
    )


__all__ = [
    "COMPONENTS_ENV",
    "COMPONENTS_FLAG",
    "Encoder",
    "TransformerLayout",
    "load_transformer_file",
    "read_header",
]
