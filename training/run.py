"""One training run end to end: prepare (``setup``) → plan → encode → loop → evaluate → export.

The LORA-FINE checklist, in order: the base model is resolved locally, fingerprinted and checked;
the dataset is scanned, cleaned, split and summarised; the LoRA insertion points and rank are
resolved against the real modules (``training.setup``); the resolved hyperparameters are saved
(``train_config.toml``, ``plan.json``); the inference test plan (prompts, seeds, guidance) is fixed
before training; validation loss, the similarity measure (and a CLIP score when a local model is
given) go to ``report.json``; the adapter is exported with all of it in its metadata. The base
weights are hashed before and after training and must not change.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from basemodel.settings import load_settings
from training import TRAINER_NAME, TRAINER_VERSION
from training.checkpoint import CHECKPOINTS, Checkpoint, atomic_write_text, load_checkpoint, resolve_resume
from training.config import TrainConfig, to_toml
from training.data.cache import EncodeCache, EncodedItem, encode_dataset
from training.data.dataset import PreparedData
from training.errors import CheckpointError, TrainConfigError
from training.evaluate import build_validation
from training.export import (
    adapter_id_for,
    build_metadata,
    check_exportable,
    export_adapter,
    finish_line,
    register_adapter,
)
from training.flow import FlowObjective
from training.loop import METRICS, LoopResult, Trainer, TrainerParts
from training.lora import adapter_tensors, base_weights_hash
from training.objective import NoiseObjective, training_scheduler
from training.plan import format_plan
from training.plot import plot_loss_curve
from training.samples import SampleBook
from training.setup import RunSetup, build_plan, precision, prepare_run

__all__ = ["RunResult", "precision", "train"]

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


def default_prompts(config: TrainConfig, data: PreparedData, limit: int = 4) -> list[str]:
    if config.sample_prompts:
        return [p.replace("{trigger}", config.trigger_word or "").strip(" ,") for p in config.sample_prompts]
    pool = [e.caption for e in (data.val or data.train)]
    return list(dict.fromkeys(pool))[:limit]


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


def _identity(setup: RunSetup) -> dict[str, Any]:
    """What a checkpoint must share with this run to continue it."""
    config, base = setup.config, setup.base
    return {
        "base_model": base.name,
        "base_fingerprint": base.fingerprint,
        "architecture_id": base.architecture.architecture_id,
        "dataset_sha256": setup.data.summary["content_sha256"],
        "lora": setup.injection.lora_config,
        "sizes": sorted({f"{w}x{h}" for w, h in setup.train_sizes}),
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


@dataclass
class Encoded:
    train: list[EncodedItem]
    val: list[EncodedItem]
    objective: NoiseObjective | FlowObjective
    store: EncodeCache

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type


def objective_for(setup: RunSetup) -> NoiseObjective | FlowObjective:
    """Flow matching on flow-matching families (SD3, Flux); noise/v prediction on the DDPM ones, where
    ``--prediction-type`` may differ from the base's (samples then use the trained one)."""
    config, pipe = setup.config, setup.pipe
    if setup.base.family.flow_matching:
        return FlowObjective(dict(pipe.scheduler.config), config)
    scheduler: Any = training_scheduler(dict(pipe.scheduler.config), config.prediction_type)
    trained, native = scheduler.config.prediction_type, pipe.scheduler.config.prediction_type
    if trained != native:
        log.warning("training %s on a %s base; samples use the trained prediction type", trained, native)
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=trained)
    return NoiseObjective(scheduler, config)


def encode(setup: RunSetup, output: Path) -> Encoded:
    """Latents and embeddings of both splits; the training objective."""
    config = setup.config
    folder = (config.cache_dir or output / "cache") if config.cache == "disk" else None
    store = EncodeCache(folder, setup.base.fingerprint)
    common: dict[str, Any] = {"device": setup.base.device, "dtype": setup.vae_dtype, "store": store}
    cache_text = not config.train_text_encoder
    data = setup.data
    conditioner = setup.conditioner
    train_items = encode_dataset(
        data.train,
        setup.train_sizes,
        conditioner,
        flip=config.random_flip,
        cache_text=cache_text,
        progress=config.progress,
        **common,
    )
    val_items = encode_dataset(
        data.val, setup.val_sizes, conditioner, flip=False, cache_text=cache_text, **common
    )
    return Encoded(train_items, val_items, objective_for(setup), store)


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
    output = Path(config.output)
    checkpoint = load_checkpoint(resolve_resume(config.resume, output)) if config.resume else None
    phases = Phases()
    setup = prepare_run(config, models_dir or load_settings().models_dir)
    config = setup.config  # with the family's defaults
    phases.done("load and prepare")
    plan = build_plan(setup)
    phases.done("plan (memory probe)")
    echo(finish_line(config, checkpoint.state.get("config") if checkpoint is not None else None))
    if config.dry_run:
        echo(format_plan(plan))
        return RunResult(output, plan)

    prepare_output(output, resuming=checkpoint is not None, overwrite=config.overwrite)
    atomic_write_text(output / CONFIG_FILE, to_toml(config))
    atomic_write_text(output / PLAN_FILE, json.dumps(plan, indent=1, default=str))
    identity = _identity(setup)
    if checkpoint is not None:
        _check_resume(checkpoint.state.get("identity", {}), identity)
    encoded = encode(setup, output)
    phases.done("encode latents and captions")

    pipe = setup.pipe
    prompts = default_prompts(config, setup.data)
    conditioner = setup.conditioner
    book = SampleBook(
        conditioner,
        config,
        prompts,
        setup.sample_size,
        output,
        with_text_encoder=config.train_text_encoder,
        autocast=setup.autocast,
    )
    frozen = (conditioner.denoiser, pipe.vae, *conditioner.all_encoders.values())
    base_hash = base_weights_hash(*frozen)
    trainer = _trainer(setup, encoded, output, identity, book if prompts else None, on_step, checkpoint, echo)
    result = trainer.run()
    phases.done("train")
    if base_weights_hash(*frozen) != base_hash:
        raise AssertionError("base model weights changed during training (only LoRA parameters may train)")
    plot_loss_curve(trainer.metrics.rows, output / "loss_curve.png", title=f"{adapter_id_for(config)}: loss")
    run = RunResult(output, plan, loop=result)
    if result.interrupted:
        echo(
            f"interrupted at step {result.step}/{result.total_steps}; checkpoint {result.last_checkpoint}\n"
            f"resume with: loraswap train --output {output} --resume latest"
        )
        return run
    evaluation = book.evaluate(encoded.val or encoded.train, setup.data, result, clip_model=config.clip_model)
    evaluation |= {"base_weights_unchanged": True, "base_weights_sha256": base_hash}
    phases.done("evaluate")
    _finish(run, setup, encoded, book, evaluation, started)
    phases.done("export")
    assert run.report is not None
    run.report["timings_s"] = phases.times
    atomic_write_text(output / REPORT, json.dumps(run.report, indent=1, default=str))
    return run


def _trainer(
    setup: RunSetup,
    encoded: Encoded,
    output: Path,
    identity: dict[str, Any],
    book: SampleBook | None,
    on_step: Callable[[Trainer], None] | None,
    checkpoint: Checkpoint | None,
    echo: Any,
) -> Trainer:
    config = setup.config
    trainer = Trainer(
        TrainerParts(
            config=config,
            pipe=setup.pipe,
            conditioner=setup.conditioner,
            injection=setup.injection,
            train_items=encoded.train,
            repeats=setup.repeats,
            val_batches=build_validation(encoded.val, encoded.objective, config.val_timesteps, config.seed),
            objective=encoded.objective,
            device=setup.base.device,
            dtype=setup.weight_dtype,
            amp_dtype=setup.amp_dtype,
            output=output,
            total_steps=setup.schedule["total_steps"],
            identity=identity,
            sampler=book.grid_at if book is not None else None,
            on_step=on_step,
        )
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
        echo(f"resumed from {checkpoint.path} at step {checkpoint.step}")
    return trainer


def _finish(
    run: RunResult,
    setup: RunSetup,
    encoded: Encoded,
    book: SampleBook,
    evaluation: dict[str, Any],
    started: datetime,
) -> None:
    """Assemble the report; export and register the adapter."""
    config, result = setup.config, run.loop
    assert result is not None
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
        "resolution": setup.resolution,
        "mixed_precision_effective": setup.mixed_precision,
        "prediction_type_effective": encoded.prediction_type,
        "total_steps": result.total_steps,
    }
    report: dict[str, Any] = {
        "trainer": f"{TRAINER_NAME} {TRAINER_VERSION}",
        "adapter_id": adapter_id_for(config),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "steps": result.step,
        "elapsed_s": round(result.elapsed_s, 2),
        "steps_per_s": round(result.steps_per_s, 3),
        "base_model": run.plan["base_model"],
        "dataset": setup.data.summary,
        "hyperparameters": hyper,
        "evaluation": evaluation,
        "inference": inference,
        "plan": {k: run.plan[k] for k in ("trainable_params", "modules", "memory")},
        "cache": {"mode": config.cache, "hits": encoded.store.hits, "misses": encoded.store.misses},
    }
    run.report = report
    if not config.export:
        return
    metadata = build_metadata(
        config,
        setup.base,
        hyperparameters=hyper,
        dataset=setup.data.summary,
        evaluation=evaluation,
        inference=inference,
        started_at=started,
        finished_at=finished,
        steps=result.step,
        epochs=result.step / max(1, setup.schedule["steps_per_epoch"]),
    )
    conditioner = setup.conditioner
    tensors = adapter_tensors(
        conditioner.denoiser,
        conditioner.text_encoders,
        config.train_text_encoder,
        denoiser_name=setup.base.family.denoiser,
    )
    exported = export_adapter(tensors, config, setup.base, metadata, run.output)
    report["adapter"] = {"path": str(exported.path), "bytes": exported.size}
    run.adapter_path = exported.path
    if config.register_id:
        exported = register_adapter(exported, config, setup.base, run.output)
        report["adapter"] |= {"ref": exported.ref, "sha256": exported.sha256}
        run.ref = exported.ref
