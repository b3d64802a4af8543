"""Adapter metadata (schema 1): the ``loraswap`` JSON header entry and the kohya/modelspec keys.

A normalised adapter file carries, in its safetensors header (all values are strings):

* ``loraswap``: ``AdapterMetadata.model_dump_json()`` — the full record below;
* the keys other tools read: ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version``,
  ``ss_new_sd_model_hash``, ``ss_training_started_at``, ``ss_steps``, ``sshs_model_hash`` and
  ``modelspec.*`` (see ``interop_keys``). Keys whose value is unknown are omitted, not faked.

Fields the registry owns (``adapter_id``, ``version``, ``created_at``, ``base_model``,
``base_model_match``, ``source_format`` and the tensor summary ``target_modules``/``rank``/``alpha``/
``rank_pattern``/``alpha_pattern``/``dtype``) are overwritten at registration; the rest is the user's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticSerializationError

from adapters.errors import AdapterInvalid
from basemodel.errors import JSONTooDeep, ValidationFailed
from basemodel.families import find_family
from basemodel.jsonlimits import loads

SCHEMA_VERSION: Literal[1] = 1
METADATA_KEY = "loraswap"
MIN_SCALE, MAX_SCALE = -4.0, 4.0
"""Every adapter weight (a request's ``scale``, a prompt tag's weight, ``scale_default``) is in this range."""
MAX_METADATA_BYTES = 64 << 10
"""User-owned metadata, as JSON, is at most this long (it goes into the file header; the title twice)."""

SourceFormat = Literal["diffusers", "diffusers-legacy", "kohya", "a1111", "ai-toolkit", "xlabs", "loraswap"]
AdapterKind = Literal["lora", "loha", "lokr", "full", "dora", "embedding"]
"""What an adapter's tensors are (``adapters.kinds``); metadata without it (older files) is a LoRA."""
TensorDType = Literal["fp32", "fp16", "bf16"]


def check_scale(value: float, *, field: str, what: str | None = None) -> float:
    """``value`` if it is a finite adapter weight in [MIN_SCALE, MAX_SCALE], else ``ValidationFailed``.

    The one check for every weight that enters: request adapters, prompt tags, ``scale_default``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        ok = False
    else:
        ok = MIN_SCALE <= value <= MAX_SCALE
    if not ok:
        raise ValidationFailed(
            f"{what or field} must be a finite number from {MIN_SCALE:g} to {MAX_SCALE:g}, got {value!r}",
            detail={"field": field, "min": MIN_SCALE, "max": MAX_SCALE},
        )
    return float(value)


class _Section(BaseModel):
    """Optional free-form section: known fields are typed, anything else is kept as given."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class BaseModelInfo(BaseModel):
    """Identity of the base model an adapter was registered (or trained) against."""

    model_config = ConfigDict(extra="forbid")

    name: str
    fingerprint: str | None = None
    architecture_id: str | None = None
    family: str | None = None
    prediction_type: str | None = None
    """``epsilon`` or ``v_prediction`` (SD2 768-v); unknown (older records) reads as the family's default."""


class TrainingInfo(_Section):
    steps: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    resolution: int | None = None
    optimizer: str | None = None
    lr_scheduler: str | None = None
    mixed_precision: str | None = None
    seed: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class DatasetInfo(_Section):
    name: str | None = None
    num_images: int | None = None
    summary: str | None = None
    sha256: str | None = None


class EvaluationInfo(_Section):
    metrics: dict[str, float] = Field(default_factory=dict)
    notes: str | None = None


class InferencePlan(_Section):
    """Prompts the inference test plan renders with this adapter."""

    prompts: list[str] = Field(default_factory=list)
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    seeds: list[int] = Field(default_factory=list)
    width: int | None = None
    height: int | None = None


class AdapterMetadata(BaseModel):
    """Everything known about one adapter artifact. All optional sections default to ``None``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    adapter_id: str | None = None
    version: int | None = Field(default=None, ge=1)
    title: str | None = None
    description: str | None = None
    created_at: datetime | None = None

    base_model: BaseModelInfo | None = None
    base_model_match: bool | None = None
    source_format: SourceFormat | None = None
    kind: AdapterKind | None = None  # None: a LoRA (the only kind before LyCORIS adapters)

    target_modules: list[str] = Field(default_factory=list)
    rank: int | None = Field(default=None, ge=1)
    alpha: float | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    dtype: TensorDType | None = None

    scale_default: float | None = Field(default=None, ge=MIN_SCALE, le=MAX_SCALE)
    trigger_words: list[str] | None = None
    training: TrainingInfo | None = None
    dataset: DatasetInfo | None = None
    evaluation: EvaluationInfo | None = None
    inference: InferencePlan | None = None

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


def coerce_metadata(value: AdapterMetadata | dict[str, Any] | str | None) -> AdapterMetadata:
    """User-supplied metadata (model, dict or JSON text) → ``AdapterMetadata``; bad input → AdapterInvalid."""
    if value is None:
        return AdapterMetadata()
    if isinstance(value, str):
        value = untrusted_json(value, "the metadata", reason="bad_metadata")
    try:
        meta = value if isinstance(value, AdapterMetadata) else AdapterMetadata.model_validate(value)
        meta.to_json()  # what is stored must serialise: a lone surrogate parses, never encodes
    except PydanticSerializationError:
        raise AdapterInvalid(
            "invalid adapter metadata: a string is not valid Unicode (a lone surrogate such as \\ud800)",
            reason="bad_metadata",
            hint="Send text as UTF-8; JSON escapes must encode whole characters (surrogate pairs).",
        ) from None
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'metadata'}: {e['msg']}" for e in exc.errors()]
        raise AdapterInvalid(
            "invalid adapter metadata: " + "; ".join(problems[:5]),
            reason="bad_metadata",
            detail={"problems": problems},
            hint="See docs/adapters.md for the metadata schema.",
        ) from None
    return meta


def untrusted_json(raw: bytes | str, what: str, *, reason: str) -> Any:
    """Parse JSON from a file or a client (``basemodel.jsonlimits.loads``) as ``AdapterInvalid``.

    Too deep → reason ``json_too_deep``; otherwise invalid → ``reason``.
    """
    try:
        return loads(raw, what=what)
    except JSONTooDeep as exc:
        raise AdapterInvalid(exc.message, reason="json_too_deep", detail=exc.detail) from None
    except ValidationFailed:
        raise AdapterInvalid(f"{what} is not valid JSON", reason=reason) from None


def parse_header_metadata(header: dict[str, str]) -> AdapterMetadata | None:
    """The ``loraswap`` entry of a safetensors header, or ``None`` when the file has none."""
    raw = header.get(METADATA_KEY)
    if raw is None:
        return None
    data = untrusted_json(raw, "the 'loraswap' header entry", reason="bad_metadata")
    if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise AdapterInvalid(
            f"unsupported loraswap metadata schema {data.get('schema_version')!r}",
            reason="bad_metadata",
            detail={"supported": [SCHEMA_VERSION]},
        )
    if not isinstance(data, dict):
        raise AdapterInvalid("the 'loraswap' header entry is not a JSON object", reason="bad_metadata")
    return coerce_metadata(data)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def training_from_kohya(header: dict[str, str]) -> TrainingInfo | None:
    """Best-effort training summary from a kohya-trained file's ``ss_*`` keys."""
    fields: dict[str, Any] = {}
    for key, name, cast in (
        ("ss_steps", "steps", int),
        ("ss_epoch", "epochs", int),
        ("ss_learning_rate", "learning_rate", _finite_float),
        ("ss_seed", "seed", int),
        ("ss_mixed_precision", "mixed_precision", str),
        ("ss_lr_scheduler", "lr_scheduler", str),
    ):
        value = header.get(key)
        if value in (None, "", "None"):
            continue
        try:
            fields[name] = cast(value)
        except ValueError:
            continue
    started = header.get("ss_training_started_at")
    if started:
        with contextlib.suppress(ValueError, OverflowError, OSError):
            fields["started_at"] = datetime.fromtimestamp(float(started), tz=UTC)
    return TrainingInfo(**fields) if fields else None


def _modelspec_architecture(
    family: str | None, prediction_type: str | None, config: Mapping[str, Any] | None
) -> str:
    known = find_family(family or "sd1")
    if known is None:
        return f"{family}/lora"
    return known.modelspec_architecture(prediction_type, config=config)


def _kohya_base_version(
    family: str | None, prediction_type: str | None, config: Mapping[str, Any] | None
) -> str:
    known = find_family(family or "sd1")
    return (
        known.kohya_base_version(prediction_type, config=config)
        if known is not None
        else f"loraswap_{family}"
    )


MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}
"""diffusers' ``prediction_type`` → modelspec's ``prediction_type`` value."""


def interop_keys(metadata: AdapterMetadata, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The kohya / SAI-modelspec header keys derived from ``metadata`` (values are strings).

    Alpha is folded into the weights, so the file's effective alpha equals its rank:
    ``ss_network_alpha`` is written equal to ``ss_network_dim`` (the original alpha is in
    ``loraswap.alpha``). ``sshs_model_hash`` (sha256 of the bytes after the header, kohya's definition)
    depends on the serialised data, so ``adapters.format.serialise`` adds it. ``config`` (the base's
    denoiser config) names the variant where the family's names depend on it (Flux dev / schnell, SD3
    medium / 3.5 large …).
    """
    base = metadata.base_model
    family, prediction = (base.family, base.prediction_type) if base else (None, None)
    architecture = _modelspec_architecture(family, prediction, config)
    if metadata.kind == "embedding":  # SAI modelspec's name for textual inversion
        architecture = architecture.removesuffix("/lora") + "/textual-inversion"
    keys: dict[str, str] = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": metadata.title or metadata.adapter_id or "lora",
        "ss_base_model_version": _kohya_base_version(family, prediction, config),
    }
    if prediction in MODELSPEC_PREDICTION:
        keys["modelspec.prediction_type"] = MODELSPEC_PREDICTION[prediction]
    if metadata.rank is not None:
        keys["ss_network_dim"] = str(metadata.rank)
        keys["ss_network_alpha"] = str(metadata.rank)
    if metadata.created_at is not None:
        keys["modelspec.date"] = metadata.created_at.isoformat()
    if metadata.base_model is not None and metadata.base_model.fingerprint:
        keys["ss_new_sd_model_hash"] = metadata.base_model.fingerprint
    training = metadata.training
    if training is not None and training.started_at is not None:
        keys["ss_training_started_at"] = str(training.started_at.timestamp())
    if training is not None and training.steps is not None:
        keys["ss_steps"] = str(training.steps)
    return keys
