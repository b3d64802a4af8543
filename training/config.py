"""``TrainConfig``: every training option, validated once, settable from TOML and the command line.

Precedence: built-in defaults < ``--config train.toml`` < command-line flags. TOML keys may use dashes
or underscores, may be grouped under any one level of tables (``[lora]``, ``[data]`` … are just for
readability) and may use the names kohya sd-scripts / the diffusers example script use for the same
thing (``network_dim``, ``max_train_steps``, ``learning_rate`` …, see ``ALIASES``).
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.validate import MAX_ALPHA_RATIO
from training.errors import TrainConfigError

DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DEFAULT_STEPS = 500

# Names other trainers use for the same option → our field name (TOML keys and extra CLI spellings).
ALIASES: dict[str, str] = {
    "pretrained_model_name_or_path": "base_model",
    "train_data_dir": "data",
    "output_dir": "output",
    "max_train_steps": "steps",
    "num_train_epochs": "epochs",
    "max_train_epochs": "epochs",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "lr",
    "unet_lr": "lr",
    "adam_weight_decay": "weight_decay",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "network_dropout": "dropout",
    "min_snr_gamma": "snr_gamma",
    "enable_bucket": "buckets",
    "checkpointing_steps": "checkpoint_every",
    "save_every_n_steps": "checkpoint_every",
    "validation_steps": "validate_every",
    "sample_every_n_steps": "sample_every",
    "resume_from_checkpoint": "resume",
    "validation_prompt": "sample_prompts",
    "checkpoints_total_limit": "keep_checkpoints",
    "save_precision": "save_dtype",
    "caption_prefix": "trigger_word",
    "register": "register_id",
}

# Options that only make sense on the command line (or are resolved per invocation).
CLI_ONLY = {"dry_run", "resume", "overwrite"}
# What a run does beyond its output folder: never inherited from the run ``--resume`` continues (which
# may inherit hyperparameters), so a resume registers only when this invocation says so.
ACTIONS = {"register_id", "store"}


class TrainConfig(BaseModel):
    """All options of ``loraswap train``. Field descriptions are the ``--help`` text."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- model and data ------------------------------------------------------------------------------
    base_model: str = Field(
        "tiny-sd", description="'tiny-sd', a local diffusers folder or a .safetensors file"
    )
    base_components: Path | None = Field(
        None,
        description="a diffusers folder supplying what a single-file SD3/Flux checkpoint lacks (text "
        "encoders, tokenizers, VAE), as 'serve --base-components'",
    )
    base_model_sha256: str | None = Field(
        None, description="refuse to train unless the base model's fingerprint starts with this"
    )
    data: Path = Field(description="dataset folder (images + .txt/.caption files, or metadata.jsonl)")
    output: Path = Field(description="run folder: checkpoints, samples, metrics, report, adapter")
    val_data: Path | None = Field(None, description="validation folder (default: DATA/val if present)")
    caption_template: str | None = Field(
        None, description="caption format with {caption} and {trigger} (default '{trigger}, {caption}')"
    )
    trigger_word: str | None = Field(
        None, description="trigger word added to captions that lack it, and to the metadata"
    )
    caption_extension: str | None = Field(
        None, description="caption file suffix (default: .txt, then .caption)"
    )
    caption_column: str = Field("text", description="caption key in metadata.jsonl")
    image_column: str = Field("file_name", description="image path key in metadata.jsonl")
    default_caption: str | None = Field(
        None, description="caption for images without one (default: skip them)"
    )
    resolution: int | None = Field(None, ge=8, le=4096, description="training size in px (default: model's)")
    buckets: bool = Field(False, description="aspect-ratio buckets instead of square center crops")
    random_flip: bool = Field(False, description="random horizontal flips (both flips are cached)")
    val_split: float = Field(
        0.1, ge=0.0, lt=1.0, description="held-out fraction when there is no val/ folder"
    )
    cache: Literal["memory", "disk"] = Field(
        "memory", description="keep encoded latents/embeddings in memory only, or also on disk for reuse"
    )
    cache_dir: Path | None = Field(None, description="folder of the disk cache (default OUTPUT/cache)")

    # -- schedule --------------------------------------------------------------------------------------
    steps: int | None = Field(None, ge=1, description=f"optimizer steps (default {DEFAULT_STEPS})")
    epochs: int | None = Field(None, ge=1, description="passes over the training set (instead of --steps)")
    batch_size: int = Field(4, ge=1, description="images per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the UNet LoRA")
    text_encoder_lr: float | None = Field(None, gt=0, description="learning rate of the text-encoder LoRA")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="decay after warm-up"
    )
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 disables)")

    # -- LoRA ------------------------------------------------------------------------------------------
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: rank, i.e. scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_UNET_TARGETS),
        description="UNet module names (suffixes) to adapt, e.g. to_q to_k to_v to_out.0 ff.net.2 conv1",
    )
    train_text_encoder: bool = Field(False, description="also train a text-encoder LoRA")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGETS), description="text-encoder module names"
    )
    init: Literal["gaussian", "kaiming"] = Field(
        "gaussian", description="init of lora_A (lora_B starts at 0)"
    )
    rslora: bool = Field(False, description="rank-stabilised scale alpha/sqrt(r)")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA, PEFT use_dora): a dora adapter")

    # -- precision, device, diffusion ------------------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="autocast dtype of the base")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting gamma (5 is typical)")
    noise_offset: float = Field(
        0.0, ge=0, description="noise offset (0.05-0.1 helps very dark/bright images)"
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="training target (default: the base scheduler's)"
    )
    weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] | None = Field(
        None,
        description="flow-matching bases (SD3, Flux): timestep density / loss weighting "
        "(default: SD3 logit_normal, Flux none, as diffusers' scripts)",
    )
    logit_mean: float = Field(0.0, description="mean of the logit_normal timestep density")
    logit_std: float = Field(1.0, gt=0, description="std of the logit_normal timestep density")
    mode_scale: float = Field(1.29, description="scale of the mode timestep density")
    train_guidance: float = Field(
        1.0,
        ge=0,
        description="the embedded guidance a guidance-distilled base (Flux-dev) trains at "
        "(train_dreambooth_lora_flux.py's --guidance_scale, default 1 as there)",
    )
    seed: int = Field(0, ge=0, description="seed of everything random (same seed, same weights)")

    # -- monitoring ------------------------------------------------------------------------------------
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="how many step checkpoints to keep")
    validate_every: int = Field(100, ge=0, description="validation loss every N steps (0: start/end only)")
    val_timesteps: int = Field(5, ge=1, le=50, description="fixed timesteps per validation image")
    sample_every: int = Field(0, ge=0, description="sample grid every N steps (0: only at the end)")
    sample_prompts: list[str] | None = Field(
        None, description="sample prompt templates ({trigger} allowed; default: validation captions)"
    )
    negative_prompt: str = Field("", description="negative prompt of samples and the exported metadata")
    guidance_scale: float = Field(
        7.5,
        ge=0,
        description="guidance scale of samples and the exported metadata (default: the family's, "
        "7.5 on SD1.x/SD2.x/SDXL, 7.0 on SD3, Flux-dev's distilled 3.5)",
    )
    sample_steps: int = Field(20, ge=1, le=200, description="inference steps of samples")
    sample_seeds: list[int] = Field(
        default_factory=lambda: [0, 1], description="seeds of every sample prompt"
    )
    eval_samples: int = Field(8, ge=0, description="images per model for the similarity measure (0: skip)")
    clip_model: Path | None = Field(None, description="local CLIP folder for a CLIP score (never downloaded)")
    progress: bool = Field(True, description="tqdm progress bar")

    # -- export ----------------------------------------------------------------------------------------
    export: bool = Field(True, description="write OUTPUT/adapter.safetensors at the end")
    adapter_id: str | None = Field(None, description="adapter id in metadata/registry (default: output name)")
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="dtype of the exported tensors")
    register_id: str | None = Field(None, description="register the export as the next version of this id")
    store: str | None = Field(None, description="adapter store URI for --register (default: local store)")

    # -- per invocation --------------------------------------------------------------------------------
    resume: str | None = Field(None, description="'latest' or a checkpoint folder to continue from")
    dry_run: bool = Field(False, description="print the plan (params, modules, steps, memory) and exit")
    overwrite: bool = Field(False, description="replace a previous run in OUTPUT instead of refusing")

    @field_validator("target_modules", "text_encoder_target_modules")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip() for v in value if v.strip()]
        if not cleaned:
            raise ValueError("needs at least one module name")
        return cleaned

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, value: str | None) -> str | None:
        if value and not value.startswith("."):
            return "." + value
        return value

    @field_validator("sample_seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one seed")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        if self.register_id and not self.export:
            raise ValueError("register needs export (drop --no-export)")
        if self.caption_template is not None and "{caption}" not in self.caption_template:
            raise ValueError("caption_template must contain {caption}")
        if self.caption_template and "{trigger}" in self.caption_template and not self.trigger_word:
            raise ValueError("caption_template uses {trigger} but no trigger_word is set")
        if self.lora_scale > MAX_ALPHA_RATIO:  # the registry refuses such files: fail before training
            raise ValueError(
                f"alpha {self.lora_alpha:g} gives a LoRA scale of {self.lora_scale:g} at rank {self.rank}; "
                f"the registry accepts at most {MAX_ALPHA_RATIO} (alpha <= {MAX_ALPHA_RATIO} x rank)"
            )
        return self

    # -- derived values --------------------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / (self.rank**0.5 if self.rslora else self.rank)

    @property
    def template(self) -> str:
        if self.caption_template is not None:
            return self.caption_template
        return "{trigger}, {caption}" if self.trigger_word else "{caption}"

    def hyperparameters(self) -> dict[str, Any]:
        """The resolved options as plain JSON values (what is saved next to the outputs)."""
        return json.loads(self.model_dump_json(exclude=CLI_ONLY))


def canonical_key(key: str) -> str:
    name = key.strip().lower().replace("-", "_")
    return ALIASES.get(name, name)


def _flatten(table: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for inner_key, inner in value.items():
                if isinstance(inner, dict):
                    raise TrainConfigError(f"{source}: tables nest one level at most ([{key}.{inner_key}])")
                flat[canonical_key(inner_key)] = inner
        else:
            flat[canonical_key(key)] = value
    return flat


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config into canonical option names (unknown names are reported by ``build``)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"{path}: invalid TOML: {exc}") from None
    values = _flatten(raw, str(path))
    base = path.parent
    for key in ("data", "output", "val_data", "cache_dir", "clip_model"):
        if isinstance(values.get(key), str) and not Path(values[key]).expanduser().is_absolute():
            values[key] = str(base / values[key])  # relative paths are relative to the config file
    return values


def build_config(*layers: dict[str, Any]) -> TrainConfig:
    """Merge option layers (later wins) and validate; problems become one ``TrainConfigError``."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = {canonical_key(k): v for k, v in layer.items()}
        if "steps" in layer and layer["steps"] is not None:
            merged.pop("epochs", None)  # a later layer choosing steps overrides an earlier epochs
        if "epochs" in layer and layer["epochs"] is not None:
            merged.pop("steps", None)
        merged.update(layer)
    known = set(TrainConfig.model_fields)
    unknown = sorted(set(merged) - known)
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            problems.append(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TrainConfigError("; ".join(problems), detail={"problems": problems})
    try:
        return TrainConfig(**merged)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise TrainConfigError(
            "invalid training options: " + "; ".join(problems), detail={"problems": problems}
        ) from None


def _describe(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{loc}: required (--{loc.replace('_', '-')} or '{loc} = …' in the config file)"
    return f"{loc}: {msg}" if loc else msg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def to_toml(config: TrainConfig) -> str:
    """The resolved config as a TOML file that ``--config`` reads back to the same ``TrainConfig``."""
    lines = ["# loraswap train: resolved configuration (loraswap train --config this-file)"]
    for key, value in config.hyperparameters().items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
