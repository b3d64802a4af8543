"""The optimisation loop: batches, loss, AdamW + schedule, accumulation, mixed precision, periodic
validation / samples / checkpoints, ``metrics.jsonl``, and a clean stop on Ctrl-C.

Determinism: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``; every other
random draw (latent sample, flip, noise, timestep) comes from one CPU generator whose state is saved
in checkpoints together with the global torch RNG (LoRA dropout). A run resumed from a checkpoint
therefore performs exactly the same floating-point operations as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from training.checkpoint import Checkpoint, atomic_write_text, capture_rng, restore_rng, save_checkpoint
from training.conditioning import Conditioner, stack
from training.config import TrainConfig
from training.data.cache import EncodedItem
from training.errors import CheckpointError, TrainingDiverged
from training.evaluate import ValBatch, validation_loss
from training.lora import Injection, load_trainable_state, trainable_state
from training.objective import Noised, lr_lambda

log = logging.getLogger(__name__)


class Objective(Protocol):
    """What the loop needs of a training objective (``NoiseObjective``, ``FlowObjective``)."""

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Noised: ...

    def loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor: ...


METRICS = "metrics.jsonl"


def epoch_batches(
    sizes: Sequence[tuple[int, int]], repeats: Sequence[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Micro-batches of item indices for one epoch: repeats expanded, shuffled, grouped by size
    (buckets never mix), batch order shuffled. Depends only on its arguments."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    expanded = [i for i, r in enumerate(repeats) for _ in range(r)]
    order = [expanded[j] for j in torch.randperm(len(expanded), generator=generator).tolist()]
    groups: dict[tuple[int, int], list[int]] = {}
    for index in order:
        groups.setdefault(sizes[index], []).append(index)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (step, train_loss, val_loss, lr, elapsed_s)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            self.rows = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]

    def truncate_after(self, step: int) -> None:
        """Drop rows a resumed run will write again (steps after its checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


@dataclass
class LoopResult:
    step: int
    total_steps: int
    interrupted: bool
    final_val_loss: float | None
    initial_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    elapsed_s: float
    last_checkpoint: Path | None
    steps_per_s: float


@dataclass
class TrainerParts:
    """Everything the loop works on (built by ``training.run``)."""

    config: TrainConfig
    pipe: Any
    conditioner: Conditioner
    injection: Injection
    train_items: list[EncodedItem]
    repeats: list[int]
    val_batches: list[ValBatch]
    objective: Objective
    device: torch.device
    dtype: torch.dtype
    amp_dtype: torch.dtype | None
    output: Path
    total_steps: int
    identity: dict[str, Any]
    sampler: Callable[[int], None] | None = None
    on_step: Callable[[Trainer], None] | None = None  # called after every optimizer step (hooks, tests)
    extra_state: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, parts: TrainerParts) -> None:
        self.p = parts
        cfg = parts.config
        self.unet = parts.conditioner.denoiser
        self.text_encoders = parts.conditioner.text_encoders
        groups = [{"params": parts.injection.unet_params, "lr": cfg.lr}]
        if parts.injection.text_encoder_params:
            groups.append(
                {"params": parts.injection.text_encoder_params, "lr": cfg.text_encoder_lr or cfg.lr}
            )
        self.params = parts.injection.unet_params + parts.injection.text_encoder_params
        self.optimizer = torch.optim.AdamW(
            groups,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, parts.total_steps)
        )
        use_scaler = parts.amp_dtype == torch.float16 and parts.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.metrics = MetricsLog(parts.output / METRICS)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.elapsed_before = 0.0
        self.best: tuple[float, int] | None = None
        self.initial_val: float | None = None
        self.last_checkpoint: Path | None = None
        self._stop = threading.Event()
        self._started = time.monotonic()

    # -- control -------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current optimizer step, checkpoint and return (what Ctrl-C does)."""
        self._stop.set()

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.p.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.p.device.type, dtype=self.p.amp_dtype)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self._started

    # -- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "total_steps": self.p.total_steps,
            "elapsed_s": self.elapsed,
            "best_val_loss": self.best[0] if self.best else None,
            "best_step": self.best[1] if self.best else None,
            "initial_val_loss": self.initial_val,
            "scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": capture_rng(self.generator),
            "config": self.p.config.hyperparameters(),
            "identity": self.p.identity,
        } | self.p.extra_state

    def save(self) -> Path:
        self.last_checkpoint = save_checkpoint(
            self.p.output,
            self.step,
            adapter=trainable_state(self.unet, self.text_encoders),
            optimizer=self.optimizer.state_dict(),
            state=self.state(),
            keep=self.p.config.keep_checkpoints,
        )
        log.info("checkpoint saved: %s", self.last_checkpoint)
        return self.last_checkpoint

    def restore(self, ckpt: Checkpoint) -> None:
        state = ckpt.state
        try:
            load_trainable_state(self.unet, self.text_encoders, ckpt.adapter)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.lr_scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"], self.generator)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"cannot resume from {ckpt.path}: {exc}") from None
        self.step = ckpt.step
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if state.get("best_val_loss") is not None:
            self.best = (float(state["best_val_loss"]), int(state["best_step"]))
        self.initial_val = state.get("initial_val_loss")
        self.metrics.truncate_after(self.step)
        self.last_checkpoint = ckpt.path

    # -- one micro-batch -----------------------------------------------------------------------------
    def _micro_batch(self, indices: list[int]) -> torch.Tensor:
        cfg, p = self.p.config, self.p
        items = [p.train_items[i] for i in indices]
        flips = (
            (torch.rand(len(items), generator=self.generator) < 0.5).tolist()
            if cfg.random_flip
            else [False] * len(items)
        )
        latents = torch.stack(
            [it.sample_latent(self.generator, f) for it, f in zip(items, flips, strict=True)]
        )
        noised = p.objective.draw(latents, self.generator)
        with self._autocast():
            texts = [it.text for it in items if it.text is not None]
            frozen = [it.frozen for it in items if it.frozen is not None]
            inputs = p.conditioner.unet_inputs(
                tokens=stack([it.tokens for it in items]),
                text=stack(texts) if len(texts) == len(items) else None,
                added=stack([it.added_for(f) for it, f in zip(items, flips, strict=True)]),
                device=p.device,
                dtype=p.dtype,
                frozen=stack(frozen) if len(frozen) == len(items) else None,
            )
            pred = p.conditioner.predict(
                noised.noisy.to(p.device, p.dtype), noised.timesteps.to(p.device), inputs
            )
        return p.objective.loss(pred, replace(noised, target=noised.target.to(p.device)))

    def _optimizer_step(self) -> None:
        cfg = self.p.config
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _validate(self) -> float | None:
        loss = validation_loss(
            self.p.conditioner,
            self.p.val_batches,
            device=self.p.device,
            dtype=self.p.dtype,
            autocast=self._autocast(),
        )
        if loss is not None and (self.best is None or loss < self.best[0]):
            self.best = (loss, self.step)
        return loss

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        cfg, p = self.p.config, self.p
        self._started = time.monotonic()
        self.unet.train()
        if p.injection.text_encoder_params:
            for encoder in self.text_encoders.values():
                encoder.train()
        if self.step == 0 and not self.metrics.rows:
            self.initial_val = self._validate()
            self.metrics.append(
                {
                    "step": 0,
                    "train_loss": None,
                    "val_loss": self.initial_val,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "elapsed_s": 0.0,
                }
            )
        start_step, start_time = self.step, time.monotonic()
        bar = tqdm(
            total=p.total_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        previous = _install_sigint(self)
        val_loss: float | None = None
        try:
            while self.step < p.total_steps and not self._stop.is_set():
                batches = epoch_batches(
                    [it.size for it in p.train_items], p.repeats, cfg.batch_size, cfg.seed, self.epoch
                )
                while self.position < len(batches) and self.step < p.total_steps and not self._stop.is_set():
                    chunk = batches[self.position : self.position + cfg.grad_accum]
                    losses = []
                    for indices in chunk:
                        loss = self._micro_batch(indices)
                        scaled = loss / len(chunk)
                        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                        losses.append(float(loss.detach()))
                    lr = self.lr_scheduler.get_last_lr()[0]
                    self._optimizer_step()
                    self.step += 1
                    self.position += len(chunk)
                    if self.position >= len(batches):
                        self.epoch, self.position = self.epoch + 1, 0
                    train_loss = sum(losses) / len(losses)
                    if not math.isfinite(train_loss):
                        raise TrainingDiverged(f"the training loss became {train_loss} at step {self.step}")
                    last = self.step >= p.total_steps
                    val_loss = self._validate() if (self._due(cfg.validate_every) or last) else None
                    self.metrics.append(
                        {
                            "step": self.step,
                            "train_loss": train_loss,
                            "val_loss": val_loss,
                            "lr": lr,
                            "elapsed_s": round(self.elapsed, 3),
                        }
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    if p.sampler and self._due(cfg.sample_every) and not last:
                        p.sampler(self.step)
                    if p.on_step is not None:
                        p.on_step(self)
                    if self._due(cfg.checkpoint_every) or last or self._stop.is_set():
                        self.save()
                    if self.position == 0:
                        break  # the epoch ended: the next one has its own order (as a resumed run sees it)
        finally:
            bar.close()
            _restore_sigint(previous)
        done = self.step - start_step
        final_val = val_loss if val_loss is not None else self._validate()
        return LoopResult(
            step=self.step,
            total_steps=p.total_steps,
            interrupted=self._stop.is_set() and self.step < p.total_steps,
            final_val_loss=final_val,
            initial_val_loss=self.initial_val,
            best_val_loss=self.best[0] if self.best else None,
            best_step=self.best[1] if self.best else None,
            elapsed_s=self.elapsed,
            last_checkpoint=self.last_checkpoint,
            steps_per_s=done / max(1e-9, time.monotonic() - start_time),
        )


def _install_sigint(trainer: Trainer) -> Any:
    """First Ctrl-C: stop after this step and checkpoint; second: abort at once."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: FrameType | None) -> None:
        if trainer._stop.is_set():
            raise KeyboardInterrupt
        trainer.request_stop()
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    return signal.signal(signal.SIGINT, handler)


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
