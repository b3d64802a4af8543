"""Train the embedded model from scratch: the VAE first, then UNet + text encoder together.

Everything is deterministic for a given seed and step counts on CPU with a fixed thread count (on CUDA,
up to the GPU's floating-point reductions). A wall-clock budget (``minutes``) is turned into fixed step
counts after timing a few warm-up steps, and the step counts are recorded in ``recipe.json`` so the same
run can be repeated with ``--vae-steps`` and ``--unet-steps``. Every random draw (data, noise, timesteps)
comes from CPU generators, so the data stream is the same on every device.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from basemodel.atomic import staged_folder
from basemodel.pretrain.checker import FG_DISTANCE, soft_masks
from basemodel.pretrain.data import sample_batch
from basemodel.pretrain.shipped import write_checksums
from basemodel.tiny import SD15_SCHEDULER, build_text_encoder, build_unet, build_vae
from basemodel.tokenizer import MAX_LENGTH, build_tokenizer

VAE_SHARE = 0.15  # share of a wall-clock budget spent on the VAE


@dataclass
class Recipe:
    seed: int = 0
    minutes: float | None = None
    vae_steps: int | None = None
    unet_steps: int | None = None
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 1e-3
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    high_noise_weight: float | None = None  # extra weight min(1 + 1/SNR, this) on high-noise steps
    noise_offset: float = 0.0  # kohya's --noise_offset: per-(image, channel) constant added to the noise
    edge_weight: float = 0.0  # extra loss weight on latent pixels along each shape's outline
    stop_after: int | None = None  # end the UNet stage after this many steps (the schedule keeps unet_steps)
    warmup: int = 50
    threads: int = 1
    resume: str | None = None  # continue UNet + text encoder training from this pretrained folder
    vae_from: str | None = None  # take the VAE (and its latent scale) from this folder; fresh UNet
    device: str = "cpu"
    eval_every: int | None = None  # score the prompt set every N UNet steps; keep the best as OUTPUT.best
    evals: int | None = None  # or: score it this many times, evenly spaced over the UNet steps
    log: dict[str, Any] = field(default_factory=dict)

    def unet_end(self) -> int:
        """The last UNet step this run takes: ``unet_steps``, or ``stop_after`` when that is earlier."""
        total = self.unet_steps or 0
        return total if self.stop_after is None else min(total, self.stop_after)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _size_run(budget_s: float, step: Callable[[int], float], device: str) -> tuple[int, int]:
    """Time a few steps (after one warm-up step) and size the run to fill ``budget_s``.

    Returns (total steps, steps already taken). The probe steps train too: they are part of the run.
    Each step returns a float loss, which waits for the device, so the timing is real on CUDA too.
    """
    probe = 4 if device == "cpu" else 20  # GPU steps are short and their first ones noisy
    step(0)
    start = time.perf_counter()
    for i in range(probe):
        step(i + 1)
    per_step = (time.perf_counter() - start) / probe
    return max(probe + 1, int(budget_s / per_step)), probe + 1


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_part(folder: str, part: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return {k: v.float() for k, v in load_file(str(Path(folder) / part / name)).items()}


def train_vae(recipe: Recipe, budget_s: float | None) -> tuple[Any, int]:
    vae: Any = build_vae(recipe.seed + 1)
    source = recipe.resume or recipe.vae_from
    if source:  # keep the pretrained VAE and its latent scale
        vae.load_state_dict(_load_part(source, "vae"))
        config = json.loads((Path(source) / "vae" / "config.json").read_text())
        vae.register_to_config(scaling_factor=config["scaling_factor"])
        vae.to(recipe.device).eval()
        return vae, 0
    vae.to(recipe.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 11)
    noise_gen = torch.Generator().manual_seed(recipe.seed * 1000 + 12)
    total = recipe.vae_steps or 10**9

    def step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * _lr_factor(i, total, recipe.warmup)
        x = sample_batch(recipe.vae_batch, gen).images.to(recipe.device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=noise_gen).to(recipe.device)
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + recipe.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    if recipe.vae_steps is None:
        assert budget_s is not None
        # probing trains too; it is part of the run, and the LR schedule is set from the count
        total, done = _size_run(budget_s, step, recipe.device)
        recipe.vae_steps = total
    else:
        done = 0
    start = time.perf_counter()
    for i in range(done, total):
        loss = step(i)
        if i % 50 == 0 or i == total - 1:
            _say(f"vae step {i + 1}/{total} loss {loss:.4f} ({time.perf_counter() - start:.0f}s)")
    vae.eval()
    return vae, total


@torch.no_grad()
def latent_scale(vae: Any, seed: int, n: int = 512) -> float:
    x = sample_batch(n, torch.Generator().manual_seed(seed * 1000 + 13)).images.to(vae.device)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


def outline_map(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 1, size, size) in {0, 1}: a 2-px band around each shape's outline, max-pooled to ``size``.

    The shape mask is read like the checker reads it (distance from the border's median colour).
    """
    distance, _ = soft_masks((images + 1) / 2)
    shape = (distance > FG_DISTANCE).float()
    band = F.max_pool2d(shape, 3, 1, 1) + F.max_pool2d(-shape, 3, 1, 1)  # dilation minus erosion
    return F.adaptive_max_pool2d(band, size)


def train_unet(
    recipe: Recipe,
    vae: Any,
    budget_s: float | None,
    on_step: Callable[[int, Any, Any, Any], None] | None = None,
) -> tuple[Any, Any, Any, int]:
    tokenizer = build_tokenizer()
    unet: Any = build_unet(recipe.seed)
    text_encoder: Any = build_text_encoder(tokenizer, recipe.seed + 2)
    if recipe.resume:
        unet.load_state_dict(_load_part(recipe.resume, "unet"))
        text_encoder.load_state_dict(_load_part(recipe.resume, "text_encoder"))
    device = recipe.device
    unet.to(device).train()
    text_encoder.to(device).train()
    params: list[dict[str, Any]] = [
        {"params": list(unet.parameters()), "lr": recipe.unet_lr, "base": recipe.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": recipe.text_lr, "base": recipe.text_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    noise_sched: Any = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(device)
    scale = float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 21)
    noise_gen = torch.Generator().manual_seed(recipe.seed * 1000 + 22)
    cache: dict[str, torch.Tensor] = {}

    def ids_for(captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in cache]
        if missing:
            out = tokenizer(missing, padding="max_length", max_length=MAX_LENGTH, truncation=True)
            for c, ids in zip(missing, out["input_ids"], strict=True):
                cache[c] = torch.tensor(ids)
        return torch.stack([cache[c] for c in captions]).to(device)

    total = recipe.unet_steps or 10**9

    def step(i: int) -> float:
        f = _lr_factor(i, total, recipe.warmup)
        for group in opt.param_groups:
            group["lr"] = group["base"] * f
        batch = sample_batch(recipe.unet_batch, gen)
        images = batch.images.to(device)
        drop = (torch.rand(len(batch.captions), generator=noise_gen) < recipe.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(batch.captions, drop, strict=True)]
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            eps0 = torch.randn(posterior.mean.shape, generator=noise_gen).to(device)
            latents = (posterior.mean + posterior.std * eps0) * scale
        noise = torch.randn(latents.shape, generator=noise_gen)
        if recipe.noise_offset:  # hides the latent mean that survives even at t = 999 (offset noise)
            noise = noise + recipe.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=noise_gen)
        noise = noise.to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=noise_gen)
        t = t.to(device)
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden = text_encoder(ids_for(captions))[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        weight = snr[t].clamp(max=recipe.min_snr_gamma) / snr[t]
        if recipe.high_noise_weight:  # the v-loss weighting (1 + 1/SNR), clipped
            weight = weight * (1 + 1 / snr[t]).clamp(max=recipe.high_noise_weight)
        error = (pred - noise) ** 2
        if recipe.edge_weight:  # a masked loss (kohya's --masked_loss) that stresses the shape's outline
            w = 1 + recipe.edge_weight * outline_map(images, error.shape[-1])
            per_image = (w * error).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * error.shape[1])
        else:
            per_image = error.mean(dim=(1, 2, 3))
        loss = (weight * per_image).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        return float(loss.detach())

    if recipe.unet_steps is None:
        assert budget_s is not None
        total, done = _size_run(budget_s, step, device)
        recipe.unet_steps = total
    else:
        done = 0
    start = time.perf_counter()
    end = recipe.unet_end()
    for i in range(done, end):
        loss = step(i)
        if i % 25 == 0 or i == end - 1:
            _say(f"unet step {i + 1}/{total} loss {loss:.4f} ({time.perf_counter() - start:.0f}s)")
        if on_step is not None:
            on_step(i + 1, unet, text_encoder, tokenizer)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, tokenizer, total


def _save_fp16(pipe: Any, output: Path, extra: dict[str, str]) -> None:
    with staged_folder(Path(output)) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        for name, text in extra.items():
            (staging / name).write_text(text)
        write_checksums(staging)
        for p in staging.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)


EVAL_SEEDS = [100, 101]  # the reported check (loadtests/check_prompts.py) uses seeds 0-3
EVAL_PROMPTS = 48
EVAL_STEPS = 25  # DDIM steps, guidance 4: the reported check's settings


def _set_determinism(device: str) -> None:
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
        return
    # cuBLAS needs this before its first call to be deterministic; some CUDA kernels have no deterministic
    # version, so on a GPU a run is repeatable only up to those (warnings, not errors).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


class _Watcher:
    """The ``on_step`` hook of a run: OUTPUT.snapshot every ``snapshot_every`` steps, and every
    ``eval_every`` steps a prompt-set score appended to OUTPUT.evals.jsonl, keeping the best-scoring
    pipeline so far as OUTPUT.best: best by ``target_margin`` (capped at 1, every target met), then by
    the share of images with all three attributes right."""

    def __init__(self, output: Path, vae: Any, recipe: Recipe, snapshot_every: int | None) -> None:
        self.output, self.vae, self.recipe = Path(output), vae, recipe
        self.snapshot_every = snapshot_every
        self.best = (-1.0, -1.0)
        self.output.parent.mkdir(parents=True, exist_ok=True)

    def _pipe(self, unet: Any, text_encoder: Any, tokenizer: Any) -> Any:
        import copy

        from basemodel.tiny import assemble_pipeline

        parts = [copy.deepcopy(m).eval() for m in (self.vae, text_encoder, unet)]
        return assemble_pipeline(parts[0], parts[1], tokenizer, parts[2])

    def __call__(self, step: int, unet: Any, text_encoder: Any, tokenizer: Any) -> None:
        if self.snapshot_every and step % self.snapshot_every == 0:
            pipe = self._pipe(unet, text_encoder, tokenizer).to("cpu", torch.float16)
            _save_fp16(pipe, Path(f"{self.output}.snapshot"), {"step.txt": f"{step}\n"})
        if self._eval_due(step):
            self.evaluate(step, self._pipe(unet, text_encoder, tokenizer))

    def _eval_due(self, step: int) -> bool:
        r = self.recipe
        every = r.eval_every or (max(1, (r.unet_steps or 0) // r.evals) if r.evals else 0)
        return bool(every) and (step % every == 0 or step == r.unet_end())

    def evaluate(self, step: int, pipe: Any) -> None:
        from basemodel.pretrain.evaluate import prompt_scores, target_margin

        start = time.perf_counter()
        scores = prompt_scores(pipe, EVAL_SEEDS, prompts=EVAL_PROMPTS, steps=EVAL_STEPS)
        margin = target_margin(scores)
        line = {"step": step, "seeds": EVAL_SEEDS, **scores, "target_margin": round(margin, 4)}
        line["seconds"] = round(time.perf_counter() - start, 1)
        with open(f"{self.output}.evals.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        _say(
            f"eval step {step}: background {scores['background_pct']:.1f}% shape colour "
            f"{scores['shape_colour_pct']:.1f}% shape kind {scores['shape_kind_pct']:.1f}% "
            f"(margin {margin:.3f}, {line['seconds']}s)"
        )
        rank = (min(margin, 1.0), scores["all_three_pct"])
        if rank > self.best:
            self.best = rank
            extra = {"step.txt": f"{step}\n", "eval.json": json.dumps(line, indent=2) + "\n"}
            _save_fp16(pipe.to("cpu", torch.float16), Path(f"{self.output}.best"), extra)


def pretrain(
    output: Path, recipe: Recipe, command: str | None = None, snapshot_every: int | None = None
) -> Path:
    """Train VAE then UNet + text encoder; write an fp16 diffusers folder with recipe and checksums.

    ``snapshot_every`` also writes the pipeline so far to ``OUTPUT.snapshot`` every that many UNet
    steps (for watching a long run; it does not change the training). ``recipe.eval_every`` scores the
    prompt set on ``EVAL_SEEDS`` every that many steps (OUTPUT.evals.jsonl) and keeps the best-scoring
    pipeline as OUTPUT.best; reproduce it with ``--unet-steps`` (the run's) and ``--stop-after`` (its step).
    """
    from basemodel.tiny import assemble_pipeline as assemble

    torch.set_num_threads(recipe.threads)
    _set_determinism(recipe.device)
    budget = None if recipe.minutes is None else recipe.minutes * 60
    t0 = time.perf_counter()
    reuse_vae = bool(recipe.resume or recipe.vae_from)
    vae, _ = train_vae(recipe, None if budget is None or reuse_vae else budget * VAE_SHARE)
    if not reuse_vae:
        vae.register_to_config(scaling_factor=latent_scale(vae, recipe.seed))
    t1 = time.perf_counter()
    remaining = None if budget is None else max(60.0, budget - (t1 - t0))
    watcher = _Watcher(Path(output), vae, recipe, snapshot_every)
    unet, text_encoder, tokenizer, _ = train_unet(recipe, vae, remaining, on_step=watcher)
    t2 = time.perf_counter()
    recipe.log = {
        "vae_seconds": round(t1 - t0, 1),
        "unet_seconds": round(t2 - t1, 1),
        "scaling_factor": float(vae.config.scaling_factor),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if recipe.device.startswith("cuda") else "cpu",
    }
    pipe = assemble(vae, text_encoder, tokenizer, unet).to("cpu", torch.float16)
    meta = asdict(recipe)
    meta["command"] = command
    _save_fp16(pipe, Path(output), {"recipe.json": json.dumps(meta, indent=2) + "\n"})
    return Path(output)
