"""Export the trained adapter through ``adapters/`` and optionally register it.

The PEFT state dict (``unet.<module>.lora_A.weight`` …, unscaled) is normalised by
``adapters.normalise`` against the base architecture, which folds the LoRA scale (alpha/r, or
alpha/sqrt(r) with rsLoRA) into ``lora_B`` so the file applies at weight 1.0, then written by
``adapters.interop.write_diffusers`` (keys diffusers' ``load_lora_weights`` reads for any text-encoder
module set, MLP-only included) with the full ``loraswap`` metadata record and the kohya/modelspec
header keys. A DoRA run (``--dora``: PEFT ``use_dora``) also carries ``….lora_magnitude_vector``
entries: ``adapters.lycoris`` reads the state as a ``dora`` adapter (magnitudes per output row, PEFT's
weight rule) and ``write_diffusers`` writes it in PEFT's DoRA layout, so the registry stores it as kind
``dora`` and the server applies ``m ⊙ (W + ΔW) / ‖W + ΔW‖`` — the weight PEFT trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from adapters.identity import BaseIdentity
from adapters.interop import write_diffusers
from adapters.metadata import AdapterMetadata, DatasetInfo, EvaluationInfo, InferencePlan, TrainingInfo
from adapters.normalise import normalise
from adapters.refs import validate_id
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.loader import BaseModel
from basemodel.settings import load_settings
from training import TRAINER_NAME, TRAINER_VERSION
from training.config import TrainConfig
from training.errors import TrainConfigError
from training.pictures import run_pictures

ADAPTER_FILE = "adapter.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_exportable(config: TrainConfig) -> None:
    """Refuse, before any training, what export or registration would refuse after it."""
    if config.export:
        validate_id(adapter_id_for(config))
    if config.register_id:
        validate_id(config.register_id)
        settings = load_settings(store=config.store)  # a bad store URI fails here, not after training
        open_store(settings.adapter_store_uri, s3_endpoint_url=settings.s3_endpoint_url)
        if config.rank > settings.max_lora_rank:
            raise TrainConfigError(
                f"rank {config.rank} is above the registry's limit {settings.max_lora_rank}",
                hint="Lower --rank or raise LORASWAP_MAX_LORA_RANK.",
            )


def adapter_id_for(config: TrainConfig) -> str:
    """``--adapter-id`` or the output folder name made into a valid id."""
    if config.adapter_id:
        return config.adapter_id
    name = re.sub(r"[^a-z0-9._-]+", "-", config.output.resolve().name.lower()).strip("-._")
    return (name or "lora")[:64]


def finish_line(config: TrainConfig, resumed_config: dict[str, Any] | None = None) -> str:
    """What the run will write and register when it finishes, said on start. ``resumed_config`` is the
    saved config of the run being resumed: a registration it asked for is not repeated unless this
    invocation asks again, and the line says so."""
    if not config.export:
        return "on finish: no export (--no-export), nothing registered"
    path = Path(config.output) / ADAPTER_FILE
    if config.register_id:
        store = load_settings(store=config.store).adapter_store_uri
        target = f"the next version of '{config.register_id}' in {store}"
        return f"on finish: export {path}, register it as {target}"
    line = f"on finish: export {path}; nothing registered (--register ID to register)"
    earlier = (resumed_config or {}).get("register_id")
    if earlier:
        line += f"; the resumed run asked for --register {earlier}, which a resume does not repeat"
    return line


@dataclass
class ExportResult:
    path: Path
    size: int
    adapter_id: str
    ref: str | None = None
    sha256: str | None = None


def build_metadata(
    config: TrainConfig,
    base: BaseModel,
    *,
    hyperparameters: dict[str, Any],
    dataset: dict[str, Any],
    evaluation: dict[str, Any],
    inference: dict[str, Any],
    started_at: datetime,
    finished_at: datetime,
    steps: int,
    epochs: float,
) -> AdapterMetadata:
    """The full metadata record of a trained adapter (``adapters.metadata`` schema 1)."""
    identity = BaseIdentity.from_base_model(base)
    adapter_id = adapter_id_for(config)
    training = {
        "steps": steps,
        "epochs": int(epochs) if epochs >= 1 else None,
        "learning_rate": config.lr,
        "batch_size": config.batch_size,
        "resolution": hyperparameters.get("resolution"),
        "optimizer": "AdamW",
        "lr_scheduler": config.lr_scheduler,
        "mixed_precision": config.mixed_precision,
        "seed": config.seed,
        "started_at": started_at,
        "finished_at": finished_at,
        # beyond the typed fields (sections keep extra keys):
        "trainer": TRAINER_NAME,
        "trainer_version": TRAINER_VERSION,
        "epochs_exact": round(epochs, 4),
        "unet_target_modules": list(config.target_modules),
        "text_encoder_target_modules": list(config.text_encoder_target_modules)
        if config.train_text_encoder
        else [],
        "lora_scale": config.lora_scale,
        "base_model_architecture": base.architecture.family,
        "hyperparameters": hyperparameters,
    }
    summary = (
        f"{dataset.get('train_count')} train / {dataset.get('val_count')} validation images, "
        f"{dataset.get('skipped_count')} skipped; caption words {dataset.get('caption_words')}"
    )
    return AdapterMetadata(
        adapter_id=adapter_id,
        title=adapter_id,
        description=f"{'DoRA' if config.dora else 'LoRA'} trained by {TRAINER_NAME} {TRAINER_VERSION} "
        f"on {dataset.get('train_count')} images",
        base_model=identity.info(),
        source_format="loraswap",
        rank=config.rank,
        alpha=config.lora_alpha,
        dtype=config.save_dtype,
        scale_default=1.0,
        trigger_words=[config.trigger_word] if config.trigger_word else None,
        training=TrainingInfo.model_validate(training),
        dataset=DatasetInfo.model_validate(
            {
                "name": Path(config.data).name,
                "num_images": dataset.get("count"),
                "summary": summary,
                "sha256": dataset.get("content_sha256"),
                "details": dataset,
            }
        ),
        evaluation=EvaluationInfo.model_validate(
            {"metrics": headline_metrics(evaluation), "notes": evaluation.get("notes"), "details": evaluation}
        ),
        inference=InferencePlan(**inference),
    )


def headline_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics: the losses, the similarity scores and the CLIP scores."""
    out = {
        k: float(v) for k, v in evaluation.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for section in ("dataset_similarity", "clip_score"):
        values = evaluation.get(section) or {}
        for key in ("base", "adapter", "relative_improvement"):
            if isinstance(values.get(key), int | float):
                out[f"{section}.{key}"] = float(values[key])
    return out


def export_adapter(
    tensors: dict[str, torch.Tensor],
    config: TrainConfig,
    base: BaseModel,
    metadata: AdapterMetadata,
    output: Path,
) -> ExportResult:
    """Normalise and write ``OUTPUT/adapter.safetensors``; returns its path and size."""
    effective_alpha = config.lora_scale * config.rank  # normalise folds alpha/rank into lora_B / dora_up
    canonical, _ = normalise(tensors, base.architecture, alpha=effective_alpha)
    dtype = DTYPES[config.save_dtype]
    canonical = {k: v.to(dtype) for k, v in canonical.items()}
    path = Path(output) / ADAPTER_FILE
    data = write_diffusers(path, canonical, metadata, base.architecture)
    return ExportResult(path=path, size=len(data), adapter_id=metadata.adapter_id or adapter_id_for(config))


def register_adapter(
    result: ExportResult, config: TrainConfig, base: BaseModel, output: Path | None = None
) -> ExportResult:
    """Register the exported file as the next version of ``--register ID`` in ``--store``, with the
    run's loss curve and last sample grid (from ``output``) as its pictures."""
    assert config.register_id is not None
    settings = load_settings(store=config.store)
    registry = Registry.from_settings(settings, BaseIdentity.from_base_model(base))
    pictures = run_pictures(output, registry.picture_limits) if output is not None else []
    version = registry.register(result.path, config.register_id, pictures=pictures)
    result.ref, result.sha256 = version.ref, version.sha256
    return result
