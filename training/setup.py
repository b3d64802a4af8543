"""Preparing a run: load and check the base model, scan the data, choose sizes and precision, inject
the LoRA, and describe it all as the plan (what ``--dry-run`` prints and ``plan.json`` keeps).

The checks, in order: the base model is resolved locally and fingerprinted (sha256 of its weight
files; ``--base-model-sha256`` pins it) and must pair an SD UNet with its text encoder; the dataset is
scanned, cleaned, split and summarised; the training size must suit the VAE and UNet; the LoRA
insertion points must exist in the model.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from basemodel.errors import BaseModelError, NotSupported
from basemodel.families import ModelFamily
from basemodel.loader import BaseModel, load_base_model
from training import TRAINER_NAME, TRAINER_VERSION
from training.conditioning import Conditioner
from training.config import DEFAULT_STEPS, TrainConfig
from training.data.buckets import Size, assign_bucket, make_buckets, square_size
from training.data.dataset import CaptionRules, PreparedData, prepare_dataset
from training.errors import TrainConfigError
from training.loop import epoch_batches
from training.lora import Injection, inject
from training.plan import memory_estimate, schedule

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """Everything known before encoding: model, data, sizes, precision, LoRA and schedule."""

    config: TrainConfig
    base: BaseModel
    data: PreparedData
    resolution: int
    train_sizes: list[Size]
    val_sizes: list[Size]
    weight_dtype: torch.dtype
    amp_dtype: torch.dtype | None
    mixed_precision: str
    injection: Injection
    schedule: dict[str, Any]

    @property
    def pipe(self) -> Any:
        return self.base.pipe

    @property
    def conditioner(self) -> Conditioner:
        return Conditioner(self.base.family, self.base.pipe, self.config.train_guidance)

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.base.family.training_vae_dtype(self.pipe, self.weight_dtype)

    @property
    def repeats(self) -> list[int]:
        return [e.repeats for e in self.data.train]

    @property
    def sample_size(self) -> Size:
        return square_size(self.resolution, size_multiple(self.base))

    def autocast(self) -> AbstractContextManager[Any]:
        return _autocast(self.base.device, self.amp_dtype)


def precision(config: TrainConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None, str]:
    """(weight dtype of the frozen base, autocast dtype or None, effective mixed-precision mode)."""
    mode = config.mixed_precision
    if mode == "fp16" and device.type != "cuda":
        warnings.warn("fp16 mixed precision needs CUDA; training in fp32 on CPU instead", stacklevel=2)
        log.warning("fp16 mixed precision needs CUDA; falling back to fp32 on %s", device)
        mode = "no"
    if mode == "no":
        return torch.float32, None, mode
    amp = torch.float16 if mode == "fp16" else torch.bfloat16
    return amp, amp, mode


def _autocast(device: torch.device, amp: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def size_multiple(base: BaseModel) -> int:
    """Pixel sides must be multiples of this (VAE factor x the denoiser's down-sampling or patches)."""
    return base.family.training_size_multiple(base.pipe)


def target_sizes(
    config: TrainConfig, base: BaseModel, data: PreparedData
) -> tuple[int, list[Size], list[Size]]:
    resolution = config.resolution or base.native_size
    multiple = size_multiple(base)
    if resolution % multiple:
        raise TrainConfigError(
            f"resolution {resolution} is not a multiple of {multiple} "
            f"(VAE factor x {base.family.denoiser} down-sampling of {base.name})",
            hint=f"Use --resolution {resolution // multiple * multiple or multiple}.",
        )
    if config.buckets:
        buckets = make_buckets(resolution, multiple)
        train = [assign_bucket(e.width, e.height, buckets) for e in data.train]
        val = [assign_bucket(e.width, e.height, buckets) for e in data.val]
    else:
        square = square_size(resolution, multiple)
        train, val = [square] * len(data.train), [square] * len(data.val)
    return resolution, train, val


def check_base(config: TrainConfig, base: BaseModel) -> None:
    """The base model must be the expected checkpoint (when pinned), of a trainable family, and its
    denoiser must take what its text encoders give (the family's ``training_problems``)."""
    want = (config.base_model_sha256 or "").lower()
    if want and not base.fingerprint.startswith(want):
        raise BaseModelError(
            f"base model {base.name} has fingerprint {base.fingerprint[:16]}…, expected {want[:16]}…",
            detail={"fingerprint": base.fingerprint, "expected": want},
            hint="Point --base-model at the pinned checkpoint or update --base-model-sha256.",
        )
    if not base.family.trainable:
        raise NotSupported(
            f"training on {base.family.label} base models is not supported yet ({base.name} is one)",
            detail={"family": base.family.name},
            hint="Train on an SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 base model.",
        )
    problems = base.family.training_problems(base.pipe)
    if problems:
        raise BaseModelError(
            f"{base.name}: {'; '.join(problems)}",
            hint=f"Use a pipeline whose {base.family.denoiser} and text encoder(s) belong together.",
        )


def for_family(config: TrainConfig, family: ModelFamily) -> TrainConfig:
    """``config`` with the family's defaults where no value was given (denoiser targets, the samples'
    guidance scale, the flow-matching weighting scheme); options the family's objective has no use
    for are refused."""
    given = config.model_fields_set
    update: dict[str, Any] = {}
    if "target_modules" not in given:
        update["target_modules"] = list(family.training_targets)
    if "guidance_scale" not in given:
        update["guidance_scale"] = family.default_guidance
    if family.flow_matching:
        unused = [
            flag
            for flag, value in (
                ("--snr-gamma", config.snr_gamma),
                ("--noise-offset", config.noise_offset or None),
                ("--prediction-type", None if config.prediction_type == "auto" else config.prediction_type),
            )
            if value is not None
        ]
        if unused:
            raise TrainConfigError(
                f"{', '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} to noise-prediction "
                f"bases; {family.label} trains with flow matching",
                hint="Drop it; --weighting-scheme, --logit-mean/--logit-std and --mode-scale shape "
                "the flow-matching objective.",
            )
        if config.weighting_scheme is None:
            update["weighting_scheme"] = family.training_weighting
    elif config.weighting_scheme not in (None, "none"):
        raise TrainConfigError(
            f"--weighting-scheme applies to flow-matching bases (SD3, Flux); {family.label} is not one",
            hint="Drop --weighting-scheme (min-SNR weighting is --snr-gamma).",
        )
    return config.model_copy(update=update) if update else config


def caption_rules(config: TrainConfig) -> CaptionRules:
    return CaptionRules(
        template=config.template,
        trigger_word=config.trigger_word,
        extension=config.caption_extension,
        caption_column=config.caption_column,
        image_column=config.image_column,
        default_caption=config.default_caption,
    )


def prepare_run(config: TrainConfig, models_dir: Path) -> RunSetup:
    """Load and check the base, prepare the data, inject the LoRA (seeded), set precision."""
    torch.manual_seed(config.seed)
    base = load_base_model(
        config.base_model, models_dir, device=config.device, dtype="fp32", components=config.base_components
    )
    check_base(config, base)
    config = for_family(config, base.family)
    pipe = base.pipe
    weight_dtype, amp_dtype, mixed = precision(config, base.device)
    data = prepare_dataset(
        config.data,
        caption_rules(config),
        val_data=config.val_data,
        val_split=config.val_split,
        seed=config.seed,
    )
    resolution, train_sizes, val_sizes = target_sizes(config, base, data)
    torch.manual_seed(config.seed)  # LoRA init draws from the global RNG: same seed, same start
    conditioner = Conditioner(base.family, pipe)
    denoiser, text_encoders = conditioner.denoiser, conditioner.text_encoders
    injection = inject(denoiser, text_encoders, config, denoiser_name=base.family.denoiser)
    if weight_dtype != torch.float32:
        vae_dtype = base.family.training_vae_dtype(pipe, weight_dtype)
        for module, dtype in (
            (denoiser, weight_dtype),
            (pipe.vae, vae_dtype),
            *((encoder, weight_dtype) for encoder in conditioner.all_encoders.values()),
        ):
            for name, param in module.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(dtype)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()  # type: ignore[operator]
        if config.train_text_encoder:
            for text_encoder in text_encoders.values():
                encoder: Any = text_encoder
                enable = getattr(encoder, "activation_checkpointing_enable", None)
                (enable or encoder.gradient_checkpointing_enable)()
    # the batches of epoch 0 fix steps/epoch (sizes are known before encoding)
    repeats = [e.repeats for e in data.train]
    num_batches = len(epoch_batches(train_sizes, repeats, config.batch_size, config.seed, 0))
    steps = schedule(num_batches, config.grad_accum, config.steps, config.epochs, DEFAULT_STEPS)
    return RunSetup(
        config,
        base,
        data,
        resolution,
        train_sizes,
        val_sizes,
        weight_dtype,
        amp_dtype,
        mixed,
        injection,
        steps,
    )


def objective_summary(config: TrainConfig, base: BaseModel) -> dict[str, Any]:
    """What the loss is: flow matching (SD3, Flux: weighting, embedded guidance) or noise/v prediction."""
    family = base.family
    if family.flow_matching:
        summary: dict[str, Any] = {"kind": "flow_matching", "weighting_scheme": config.weighting_scheme}
        if config.weighting_scheme == "logit_normal":
            summary |= {"logit_mean": config.logit_mean, "logit_std": config.logit_std}
        if config.weighting_scheme == "mode":
            summary["mode_scale"] = config.mode_scale
        embeds = family.embeds_guidance(base.pipe)
        return summary | ({"train_guidance": config.train_guidance} if embeds else {})
    return {
        "kind": "noise_prediction",
        "prediction_type": config.prediction_type,
        "snr_gamma": config.snr_gamma,
        "noise_offset": config.noise_offset,
    }


def build_plan(setup: RunSetup) -> dict[str, Any]:
    """The plan: identity of the base, data counts, schedule, LoRA layout, memory estimate."""
    config, base, injection = setup.config, setup.base, setup.injection
    conditioner = setup.conditioner
    models = [conditioner.denoiser, *conditioner.text_encoders.values()]
    base_params = sum(p.numel() for m in models for n, p in m.named_parameters() if "lora_" not in n)
    return {
        "trainer": f"{TRAINER_NAME} {TRAINER_VERSION}",
        "base_model": {
            "name": base.name,
            "path": str(base.ref.path),
            "fingerprint": base.fingerprint,
            "family": base.architecture.family,
            "architecture_id": base.architecture.architecture_id,
        },
        "device": str(base.device),
        "weight_dtype": str(setup.weight_dtype).removeprefix("torch."),
        "mixed_precision": setup.mixed_precision,
        "dataset": {
            k: setup.data.summary[k]
            for k in ("count", "train_count", "val_count", "skipped_count", "content_sha256")
        },
        "resolution": setup.resolution,
        "sizes": sorted(set(setup.train_sizes)),
        "schedule": setup.schedule,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "lr": config.lr,
        "lr_scheduler": config.lr_scheduler,
        "lr_warmup_steps": config.lr_warmup_steps,
        "weight_decay": config.weight_decay,
        "objective": objective_summary(config, base),
        "lora": injection.lora_config,
        "lora_scale": config.lora_scale,
        "modules": injection.module_counts,
        "module_paths": injection.modules,
        "trainable_params": injection.trainable,
        "trainable_percent": 100.0 * injection.trainable / max(1, base_params),
        "memory": memory_estimate(
            conditioner,
            injection,
            setup.train_sizes,
            batch_size=config.batch_size,
            device=base.device,
            dtype=setup.weight_dtype,
            train_text_encoder=config.train_text_encoder,
            autocast=setup.autocast(),
        ),
        "validate_every": config.validate_every,
        "sample_every": config.sample_every,
        "checkpoint_every": config.checkpoint_every,
        "output": str(config.output),
        "register": config.register_id,
    }
