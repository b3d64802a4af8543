"""One training run end to end: checks → data → LoRA → plan → encode → loop → evaluate → export.

The LORA-FINE checklist, in order: the base model is resolved locally, fingerprinted (sha256 of its
weight files) and its architecture described; the dataset is scanned, cleaned, split and
summarised; the LoRA insertion points and rank are resolved against the real modules; the resolved
hyperparameters are saved (``train_config.toml``, ``plan.json``); the inference test plan (prompts,
seeds, guidance) is fixed before training; validation loss, the similarity measure (and CLIP score
when a local model is given) are written to ``report.json``; the adapter is exported with all of
it in its metadata. The base weights are hashed before and after training and must not change.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from basemodel.errors import BaseModelError
from basemodel.loader import BaseModel, load_base_model
from basemodel.settings import load_settings
from training import TRAINER_NAME, TRAINER_VERSION
from training.checkpoint import CHECKPOINTS, atomic_write_text, load_checkpoint, resolve_resume
from training.config import DEFAULT_STEPS, TrainConfig, to_toml
from training.data.buckets import Size, assign_bucket, make_buckets, square_size
from training.data.cache import EncodeCache, encode_dataset
from training.data.dataset import CaptionRules, PreparedData, prepare_dataset
from training.errors import CheckpointError, TrainConfigError
from training.evaluate import build_validation
from training.export import adapter_id_for, build_metadata, check_exportable, export_adapter, register_adapter
from training.loop import METRICS, LoopResult, Trainer, TrainerParts, epoch_batches
from training.lora import Injection, adapter_tensors, base_weights_hash, inject
from training.objective import training_scheduler
from training.plan import format_plan, memory_estimate, schedule
from training.plot import plot_loss_curve
from training.samples import SampleBook

log = logging.getLogger(__name__)

REPORT = "report.json"
CONFIG_FILE = "train_config.toml"
PLAN_FILE = "plan.json"
# What must be identical for a checkpoint to continue this run.
RESUME_IDENTITY = (
    "base_fingerprint",
    "architecture_id",
    "dataset_sha256",
    "lora",
    "sizes",
    "batch_size",
    "grad_accum",
    "seed",
    "random_flip",
)


class Phases:
    """Wall time of each phase of a run (logged, and kept in ``report.json``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.times[name] = round(now - self._last, 3)
        self._last = now
        log.info("%s took %.2f s", name, self.times[name])


@dataclass
class RunResult:
    output: Path
    plan: dict[str, Any]
    loop: LoopResult | None = None
    report: dict[str, Any] | None = None
    adapter_path: Path | None = None
    ref: str | None = None

    @property
    def interrupted(self) -> bool:
        return bool(self.loop and self.loop.interrupted)


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


def size_multiple(pipe: Any) -> int:
    """Pixel sides must be multiples of this (VAE factor x UNet down-sampling)."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def target_sizes(
    config: TrainConfig, base: BaseModel, data: PreparedData
) -> tuple[int, list[Size], list[Size]]:
    resolution = config.resolution or base.native_size
    multiple = size_multiple(base.pipe)
    if resolution % multiple:
        raise TrainConfigError(
            f"resolution {resolution} is not a multiple of {multiple} "
            f"(VAE factor x UNet down-sampling of {base.name})",
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


def default_prompts(config: TrainConfig, data: PreparedData, limit: int = 4) -> list[str]:
    if config.sample_prompts:
        return [p.replace("{trigger}", config.trigger_word or "").strip(" ,") for p in config.sample_prompts]
    pool = [e.caption for e in (data.val or data.train)]
    return list(dict.fromkeys(pool))[:limit]


def check_base(config: TrainConfig, base: BaseModel) -> None:
    """The base model must be the expected checkpoint (when pinned) and an SD UNet + CLIP pair."""
    want = (config.base_model_sha256 or "").lower()
    if want and not base.fingerprint.startswith(want):
        raise BaseModelError(
            f"base model {base.name} has fingerprint {base.fingerprint[:16]}…, expected {want[:16]}…",
            detail={"fingerprint": base.fingerprint, "expected": want},
            hint="Point --base-model at the pinned checkpoint or update --base-model-sha256.",
        )
    cross = int(base.pipe.unet.config.cross_attention_dim)
    hidden = int(base.pipe.text_encoder.config.hidden_size)
    if cross != hidden:
        raise BaseModelError(
            f"{base.name}: UNet cross-attention width {cross} does not match the text encoder ({hidden})",
            hint="Use an SD1.x/SD2.x-style pipeline whose UNet and text encoder belong together.",
        )


def prepare_output(output: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a fresh run into a folder holding another run (unless ``--overwrite``)."""
    previous = [
        output / name for name in (CHECKPOINTS, METRICS, REPORT, "samples") if (output / name).exists()
    ]
    if previous and not resuming:
        if not overwrite:
            raise TrainConfigError(
                f"{output} already holds a training run ({', '.join(p.name for p in previous)})",
                hint="Continue it with --resume latest, start again with --overwrite, or use another output.",
            )
        for path in previous:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _identity(
    base: BaseModel, data: PreparedData, injection: Injection, config: TrainConfig, sizes: list[Size]
) -> dict[str, Any]:
    return {
        "base_model": base.name,
        "base_fingerprint": base.fingerprint,
        "architecture_id": base.architecture.architecture_id,
        "dataset_sha256": data.summary["content_sha256"],
        "lora": injection.lora_config,
        "sizes": sorted({f"{w}x{h}" for w, h in sizes}),
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "seed": config.seed,
        "random_flip": config.random_flip,
    }


def _check_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = [k for k in RESUME_IDENTITY if saved.get(k) != current.get(k)]
    if changed:
        raise CheckpointError(
            f"the checkpoint belongs to a different run: {', '.join(changed)} changed",
            detail={k: {"checkpoint": saved.get(k), "now": current.get(k)} for k in changed},
            hint="Resume with the same base model, data, LoRA settings, sizes, batch, accumulation and seed.",
        )


def train(
    config: TrainConfig,
    *,
    models_dir: Path | None = None,
    echo: Any = print,
    on_step: Callable[[Trainer], None] | None = None,
) -> RunResult:
    """Run (or, with ``dry_run``, only plan) a training run; see the module docstring."""
    started = datetime.now(UTC)
    check_exportable(config)
    models_dir = models_dir or load_settings().models_dir
    output = Path(config.output)
    checkpoint = load_checkpoint(resolve_resume(config.resume, output)) if config.resume else None

    phases = Phases()
    torch.manual_seed(config.seed)  # LoRA init draws from the global RNG: same seed, same start
    base = load_base_model(config.base_model, models_dir, device=config.device, dtype="fp32")
    phases.done("load base model")
    check_base(config, base)
    pipe = base.pipe
    weight_dtype, amp_dtype, mixed = precision(config, base.device)
    rules = CaptionRules(
        template=config.template,
        trigger_word=config.trigger_word,
        extension=config.caption_extension,
        caption_column=config.caption_column,
        image_column=config.image_column,
        default_caption=config.default_caption,
    )
    data = prepare_dataset(
        config.data, rules, val_data=config.val_data, val_split=config.val_split, seed=config.seed
    )
    resolution, train_sizes, val_sizes = target_sizes(config, base, data)
    torch.manual_seed(config.seed)
    injection = inject(pipe.unet, pipe.text_encoder, config)
    if weight_dtype != torch.float32:
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for name, param in module.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(weight_dtype)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder = pipe.text_encoder
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            (enable or text_encoder.gradient_checkpointing_enable)()

    # Plan: the batches of epoch 0 fix steps/epoch (sizes are known before encoding).
    repeats = [e.repeats for e in data.train]
    num_batches = len(epoch_batches(train_sizes, repeats, config.batch_size, config.seed, 0))
    sched = schedule(num_batches, config.grad_accum, config.steps, config.epochs, DEFAULT_STEPS)
    base_params = sum(
        p.numel()
        for n, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]
        if "lora_" not in n
    )
    autocast = _autocast(base.device, amp_dtype)
    phases.done("prepare data and LoRA")
    plan: dict[str, Any] = {
        "trainer": f"{TRAINER_NAME} {TRAINER_VERSION}",
        "base_model": {
            "name": base.name,
            "path": str(base.ref.path),
            "fingerprint": base.fingerprint,
            "family": base.architecture.family,
            "architecture_id": base.architecture.architecture_id,
        },
        "device": str(base.device),
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "mixed_precision": mixed,
        "dataset": {
            k: data.summary[k]
            for k in ("count", "train_count", "val_count", "skipped_count", "content_sha256")
        },
        "resolution": resolution,
        "sizes": sorted({s for s in train_sizes}),
        "schedule": sched,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "lr": config.lr,
        "lr_scheduler": config.lr_scheduler,
        "lr_warmup_steps": config.lr_warmup_steps,
        "weight_decay": config.weight_decay,
        "lora": injection.lora_config,
        "lora_scale": config.lora_scale,
        "modules": {"unet": len(injection.unet_modules), "text_encoder": len(injection.text_encoder_modules)},
        "module_paths": injection.modules,
        "trainable_params": injection.trainable,
        "trainable_percent": 100.0 * injection.trainable / max(1, base_params),
        "memory": memory_estimate(
            pipe,
            injection,
            train_sizes,
            batch_size=config.batch_size,
            device=base.device,
            dtype=weight_dtype,
            train_text_encoder=config.train_text_encoder,
            autocast=autocast,
        ),
        "validate_every": config.validate_every,
        "sample_every": config.sample_every,
        "checkpoint_every": config.checkpoint_every,
        "output": str(output),
        "register": config.register_id,
    }
    phases.done("plan (memory probe)")
    if config.dry_run:
        echo(format_plan(plan))
        return RunResult(output, plan)

    prepare_output(output, resuming=checkpoint is not None, overwrite=config.overwrite)
    atomic_write_text(output / CONFIG_FILE, to_toml(config))
    atomic_write_text(output / PLAN_FILE, json.dumps(plan, indent=1, default=str))
    identity = _identity(base, data, injection, config, train_sizes)
    if checkpoint is not None:
        _check_resume(checkpoint.state.get("identity", {}), identity)

    store = EncodeCache(
        (config.cache_dir or output / "cache") if config.cache == "disk" else None, base.fingerprint
    )
    encode: dict[str, Any] = {"device": base.device, "dtype": weight_dtype, "store": store}
    cache_text = not config.train_text_encoder
    train_items = encode_dataset(
        data.train,
        train_sizes,
        pipe,
        flip=config.random_flip,
        cache_text=cache_text,
        progress=config.progress,
        **encode,
    )
    val_items = encode_dataset(data.val, val_sizes, pipe, flip=False, cache_text=cache_text, **encode)
    noise_scheduler: Any = training_scheduler(dict(pipe.scheduler.config), config.prediction_type)
    if noise_scheduler.config.prediction_type != pipe.scheduler.config.prediction_type:
        log.warning(
            "training %s on a %s base; samples use the trained prediction type",
            noise_scheduler.config.prediction_type,
            pipe.scheduler.config.prediction_type,
        )
        pipe.scheduler = pipe.scheduler.__class__.from_config(
            pipe.scheduler.config, prediction_type=noise_scheduler.config.prediction_type
        )
    phases.done("encode latents and captions")
    val_batches = build_validation(val_items, noise_scheduler, config.val_timesteps, config.seed)

    prompts = default_prompts(config, data)
    book = SampleBook(
        pipe,
        config,
        prompts,
        square_size(resolution, size_multiple(pipe)),
        output,
        with_text_encoder=config.train_text_encoder,
        autocast=autocast,
    )
    base_hash = base_weights_hash(pipe.unet, pipe.vae, pipe.text_encoder)
    trainer = Trainer(
        TrainerParts(
            config=config,
            pipe=pipe,
            injection=injection,
            train_items=train_items,
            repeats=repeats,
            val_batches=val_batches,
            noise_scheduler=noise_scheduler,
            device=base.device,
            dtype=weight_dtype,
            amp_dtype=amp_dtype,
            output=output,
            total_steps=sched["total_steps"],
            identity=identity,
            sampler=book.grid_at if prompts else None,
            on_step=on_step,
        )
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
        echo(f"resumed from {checkpoint.path} at step {checkpoint.step}")
    result = trainer.run()
    phases.done("train")
    if base_weights_hash(pipe.unet, pipe.vae, pipe.text_encoder) != base_hash:
        raise AssertionError("base model weights changed during training (only LoRA parameters may train)")
    plot_loss_curve(trainer.metrics.rows, output / "loss_curve.png", title=f"{adapter_id_for(config)}: loss")
    run = RunResult(output, plan, loop=result)
    if result.interrupted:
        echo(
            f"interrupted at step {result.step}/{result.total_steps}; checkpoint {result.last_checkpoint}\n"
            f"resume with: loraswap train --output {output} --resume latest"
        )
        return run

    evaluation = book.evaluate(val_items or train_items, data, result, clip_model=config.clip_model)
    phases.done("evaluate")
    evaluation["base_weights_unchanged"] = True
    evaluation["base_weights_sha256"] = base_hash
    finished = datetime.now(UTC)
    inference = {
        "prompts": book.prompts,
        "negative_prompt": config.negative_prompt or None,
        "guidance_scale": config.guidance_scale,
        "steps": config.sample_steps,
        "seeds": list(config.sample_seeds),
        "width": book.size[0],
        "height": book.size[1],
    }
    hyper = config.hyperparameters() | {
        "resolution": resolution,
        "mixed_precision_effective": mixed,
        "prediction_type_effective": noise_scheduler.config.prediction_type,
        "total_steps": result.total_steps,
    }
    report = {
        "trainer": f"{TRAINER_NAME} {TRAINER_VERSION}",
        "adapter_id": adapter_id_for(config),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "steps": result.step,
        "elapsed_s": round(result.elapsed_s, 2),
        "steps_per_s": round(result.steps_per_s, 3),
        "base_model": plan["base_model"],
        "dataset": data.summary,
        "hyperparameters": hyper,
        "evaluation": evaluation,
        "inference": inference,
        "plan": {k: plan[k] for k in ("trainable_params", "modules", "memory")},
    }
    if config.export:
        metadata = build_metadata(
            config,
            base,
            hyperparameters=hyper,
            dataset=data.summary,
            evaluation=evaluation,
            inference=inference,
            started_at=started,
            finished_at=finished,
            steps=result.step,
            epochs=result.step / max(1, sched["steps_per_epoch"]),
        )
        tensors = adapter_tensors(pipe.unet, pipe.text_encoder, config.train_text_encoder)
        exported = export_adapter(tensors, config, base, metadata, output)
        report["adapter"] = {"path": str(exported.path), "bytes": exported.size}
        run.adapter_path = exported.path
        if config.register_id:
            exported = register_adapter(exported, config, base)
            report["adapter"] |= {"ref": exported.ref, "sha256": exported.sha256}
            run.ref = exported.ref
    report["cache"] = {"mode": config.cache, "hits": store.hits, "misses": store.misses}
    phases.done("export")
    report["timings_s"] = phases.times
    atomic_write_text(output / REPORT, json.dumps(report, indent=1, default=str))
    run.report = report
    return run
