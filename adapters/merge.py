"""``loraswap adapters merge``: registered adapters baked into a standalone model.

``merge_adapters`` opens each adapter version from the registry (sha256, structure and architecture
checked as for serving), computes every module's ΔW in fp32 (``adapters.delta``, any kind), adds
``Σ scaleᵢ · ΔWᵢ`` to the fp32 base weights (and ``diff_b`` to biases), casts the whole pipeline once
to the output dtype and writes it atomically:

* ``diffusers``: a folder as ``save_pretrained`` writes it (loads with ``--base-model PATH`` and
  ``DiffusionPipeline.from_pretrained``), plus ``loraswap_merge.json``;
* ``single-file``: one A1111/CivitAI/ComfyUI-layout ``.safetensors`` (SD1.x's LDM layout, SDXL's SGM
  layout, SD3's SAI layout, Flux's ComfyUI all-in-one layout; ``basemodel.single_file_export``; other
  families are refused before any work) whose
  ``__metadata__`` carries the same record under ``loraswap_merge`` and the modelspec keys.

The record names the base (name, fingerprint, architecture id, family), every adapter (``id@version``,
sha256 of the stored file, kind, scale) and the date. Output appears all at once: a staging folder or
temporary file beside the target is renamed into place, and removed on any error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from adapters.delta import bias_delta, dora_deltas, module_delta
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.kinds import ROLE_KIND, group
from adapters.metadata import check_scale
from adapters.refs import parse_ref
from adapters.registry import Registry
from adapters.tempfiles import make_temp
from basemodel.atomic import staged_folder
from basemodel.errors import ConfigError, NotSupported
from basemodel.loader import BaseModel

MergeFormat = Literal["diffusers", "single-file"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RECORD_NAME = "loraswap_merge.json"
METADATA_KEY = "loraswap_merge"
TEMP_PREFIX = ".loraswap-merge-"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class MergeItem:
    ref: str
    scale: float | None = None


def parse_item(text: str) -> MergeItem:
    """``REF[:scale]`` (``style``, ``style@3``, ``style@latest:0.7``) → a ``MergeItem``."""
    ref, sep, scale = text.rpartition(":") if ":" in text else (text, "", "")
    parse_ref(ref)
    if not sep:
        return MergeItem(ref)
    try:
        value = float(scale)
    except ValueError:
        raise AdapterInvalid(f"the weight in {text!r} is not a number", reason="bad_scale") from None
    return MergeItem(ref, check_scale(value, field="scale", what=f"the weight of {ref!r}"))


def merge_adapters(
    registry: Registry,
    base: BaseModel,
    items: Sequence[MergeItem],
    output: Path,
    *,
    fmt: MergeFormat = "diffusers",
    dtype: str = "fp16",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge ``items`` into ``base`` (loaded on CPU in fp32; its weights are changed) and write ``output``.

    Returns the merge record written with the model.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    if base.dtype != torch.float32:
        raise ConfigError("merging needs the base model loaded in fp32 (the math is fp32, cast once)")
    output = Path(output)
    if fmt == "single-file" and output.suffix.lower() != ".safetensors":
        raise ConfigError("a single-file output must end in .safetensors", detail={"output": str(output)})
    if fmt == "single-file":
        check_single_file_family(base.family)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists", hint="Choose another --output or pass --overwrite.")
    if not items:
        raise ConfigError("name at least one adapter to merge")
    targets = {
        f"{component}.{name}": module
        for component, model in base.lora_components.items()
        for name, module in model.named_modules()
    }
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    merged: list[dict[str, Any]] = []
    for item in items:
        loaded = registry.open(item.ref)
        version = loaded.version
        if version.kind == "embedding":
            raise AdapterInvalid(
                f"{version.ref} is a textual-inversion embedding: it changes no weight, so there is "
                "nothing to merge (use its id in prompts instead)",
                reason="unsupported_conversion",
            )
        scale = item.scale if item.scale is not None else (version.scale_default or 1.0)
        modules, _ = group(loaded.tensors)
        for module in modules:
            target = targets.get(module)
            if target is None or not isinstance(getattr(target, "weight", None), torch.Tensor):
                raise AdapterIncompatible(
                    f"{version.ref} adapts {module}, which the base model lacks", reason="modules_absent"
                )
        # against the base weights as loaded: no adapter has been added yet (fused parts together)
        dora = dict(
            dora_deltas(
                {m: f for m, f in modules.items() if ROLE_KIND[next(iter(f))] == "dora"},
                lambda m: targets[m].weight.detach(),
                scale,
            )
        )
        for module, factors in modules.items():
            target = targets[module]
            kind = ROLE_KIND[next(iter(factors))]
            if kind == "dora":
                delta = dora[module]
            else:
                delta = module_delta(kind, factors, tuple(target.weight.shape)) * scale
            weights[module] = weights[module] + delta if module in weights else delta
            extra = bias_delta(kind, factors)
            if extra is not None:
                if getattr(target, "bias", None) is None:
                    raise AdapterIncompatible(
                        f"{version.ref} changes the bias of {module}, which has none in the base model; "
                        "a merged checkpoint cannot add one",
                        reason="bias_absent",
                    )
                biases[module] = biases[module] + extra * scale if module in biases else extra * scale
        merged.append(
            {
                "ref": version.ref,
                "sha256": version.sha256,
                "kind": version.kind,
                "scale": scale,
                "modules": len(modules),
            }
        )
    with torch.no_grad():
        for module, delta in weights.items():
            weight = targets[module].weight
            weight.copy_(weight.to(torch.float32) + delta)
        for module, delta in biases.items():
            bias = targets[module].bias
            bias.copy_(bias.to(torch.float32) + delta)
    base.pipe.to(DTYPES[dtype])
    record = {
        "schema_version": 1,
        "created_at": datetime.now(UTC).isoformat(),
        "base_model": {
            "name": base.name,
            "fingerprint": base.fingerprint,
            "architecture_id": base.architecture.architecture_id,
            "family": base.architecture.family,
        },
        "adapters": merged,
        "dtype": dtype,
        "format": fmt,
    }
    if fmt == "diffusers":
        _write_folder(base.pipe, output, record, progress)
    else:
        from basemodel.single_file_export import pipeline_to_single_file

        _write_single_file(pipeline_to_single_file(base.pipe), output, record, base, progress)
    return record


def check_single_file_family(family: Any) -> None:
    """Single files are written in the layouts loraswap's single-file loader reads back (SD1.x, SDXL,
    SD3/SD3.5, Flux.1)."""
    from basemodel.single_file_export import WRITABLE_FAMILIES as LAYOUTS

    if family.name not in LAYOUTS:
        raise NotSupported(
            f"single-file output is written for {', '.join(sorted(LAYOUTS))} models, the layouts loraswap "
            f"loads back; this base is {family.name}",
            hint="Use --format diffusers (a folder that --base-model and diffusers load).",
        )


def _write_folder(pipe: Any, output: Path, record: dict[str, Any], progress: bool) -> None:
    with staged_folder(output) as staging:
        pipe.save_config(staging)
        components = [(name, part) for name, part in pipe.components.items() if part is not None]
        for name, part in tqdm(components, desc=f"writing {output.name}", unit="part", disable=not progress):
            if hasattr(part, "save_pretrained"):  # models write safetensors by default
                part.save_pretrained(staging / name)
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _header(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in sorted(state):
        tensor = state[key]
        size = tensor.numel() * tensor.element_size()
        entries[key] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def _write_single_file(
    state: dict[str, torch.Tensor], output: Path, record: dict[str, Any], base: BaseModel, progress: bool
) -> None:
    metadata = {
        METADATA_KEY: json.dumps(record, sort_keys=True),
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": base.family.modelspec_architecture().removesuffix("/lora"),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output.stem,
        "modelspec.date": str(record["created_at"]),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = make_temp(output.parent, TEMP_PREFIX, ".safetensors")
    total = sum(t.numel() * t.element_size() for t in state.values())
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_header(state, metadata))
            with tqdm(
                total=total, desc=f"writing {output.name}", unit="B", unit_scale=True, disable=not progress
            ) as bar:
                for chunk in _chunks(state):
                    fh.write(chunk)
                    bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _chunks(state: dict[str, torch.Tensor]) -> Iterator[bytes]:
    for key in sorted(state):
        tensor = state[key].contiguous().cpu()
        yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
