"""Train the embedded model from scratch: the VAE first, then UNet + text encoder together.

Everything is deterministic for a given seed and step counts (CPU, fixed thread count). A wall-clock
budget (``minutes``) is turned into fixed step counts after timing a few warm-up steps, and the step
counts are recorded in ``recipe.json`` so the same bytes can be reproduced with ``--vae-steps`` and
``--unet-steps``.
"""

from __future__ import annotations

import json
import math
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
    log: dict[str, Any] = field(default_factory=dict)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _steps_for(budget_s: float, step: Callable[[int], float], probe: int = 4) -> int:
    """Time ``probe`` steps (after one warm-up step) and size the run to fill ``budget_s``."""
    step(0)
    start = time.perf_counter()
    for i in range(probe):
        step(i + 1)
    per_step = (time.perf_counter() - start) / probe
    return max(probe + 1, int(budget_s / per_step))


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
        vae.eval()
        return vae, 0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + 11)
    noise_gen = torch.Generator().manual_seed(recipe.seed * 1000 + 12)
    total = recipe.vae_steps or 10**9

    def step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = recipe.vae_lr * _lr_factor(i, total, recipe.warmup)
        x = sample_batch(recipe.vae_batch, gen).images
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise_gen)
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
        total = _steps_for(budget_s, step)
        recipe.vae_steps = total
        done = 5
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
    x = sample_batch(n, torch.Generator().manual_seed(seed * 1000 + 13)).images
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
    text_encoder = build_text_encoder(tokenizer, recipe.seed + 2)
    if recipe.resume:
        unet.load_state_dict(_load_part(recipe.resume, "unet"))
        text_encoder.load_state_dict(_load_part(recipe.resume, "text_encoder"))
    unet.train()
    text_encoder.train()
    params: list[dict[str, Any]] = [
        {"params": list(unet.parameters()), "lr": recipe.unet_lr, "base": recipe.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": recipe.text_lr, "base": recipe.text_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    noise_sched: Any = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
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
        return torch.stack([cache[c] for c in captions])

    total = recipe.unet_steps or 10**9

    def step(i: int) -> float:
        f = _lr_factor(i, total, recipe.warmup)
        for group in opt.param_groups:
            group["lr"] = group["base"] * f
        batch = sample_batch(recipe.unet_batch, gen)
        drop = (torch.rand(len(batch.captions), generator=noise_gen) < recipe.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(batch.captions, drop, strict=True)]
        with torch.no_grad():
            posterior = vae.encode(batch.images).latent_dist
            eps0 = torch.randn(posterior.mean.shape, generator=noise_gen)
            latents = (posterior.mean + posterior.std * eps0) * scale
        noise = torch.randn(latents.shape, generator=noise_gen)
        if recipe.noise_offset:  # hides the latent mean that survives even at t = 999 (offset noise)
            noise = noise + recipe.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=noise_gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=noise_gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        hidden = text_encoder(ids_for(captions))[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        weight = snr[t].clamp(max=recipe.min_snr_gamma) / snr[t]
        if recipe.high_noise_weight:  # the v-loss weighting (1 + 1/SNR), clipped
            weight = weight * (1 + 1 / snr[t]).clamp(max=recipe.high_noise_weight)
        error = (pred - noise) ** 2
        if recipe.edge_weight:  # a masked loss (kohya's --masked_loss) that stresses the shape's outline
            w = 1 + recipe.edge_weight * outline_map(batch.images, error.shape[-1])
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
        total = _steps_for(budget_s, step)
        recipe.unet_steps = total
        done = 5
    else:
        done = 0
    start = time.perf_counter()
    end = total if recipe.stop_after is None else min(total, recipe.stop_after)
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


def pretrain(
    output: Path, recipe: Recipe, command: str | None = None, snapshot_every: int | None = None
) -> Path:
    """Train VAE then UNet + text encoder; write an fp16 diffusers folder with recipe and checksums.

    ``snapshot_every`` also writes the pipeline so far to ``OUTPUT.snapshot`` every that many UNet
    steps (for watching a long run; it does not change the training).
    """
    import copy

    from basemodel.tiny import assemble_pipeline as assemble

    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    budget = None if recipe.minutes is None else recipe.minutes * 60
    t0 = time.perf_counter()
    reuse_vae = bool(recipe.resume or recipe.vae_from)
    vae, _ = train_vae(recipe, None if budget is None or reuse_vae else budget * VAE_SHARE)
    if not reuse_vae:
        vae.register_to_config(scaling_factor=latent_scale(vae, recipe.seed))
    t1 = time.perf_counter()
    remaining = None if budget is None else max(60.0, budget - (t1 - t0))

    def snapshot(step: int, unet: Any, text_encoder: Any, tokenizer: Any) -> None:
        if snapshot_every and step % snapshot_every == 0:
            parts = [copy.deepcopy(m).eval() for m in (vae, text_encoder)]
            pipe = assemble(parts[0], parts[1], tokenizer, copy.deepcopy(unet).eval()).to(torch.float16)
            _save_fp16(pipe, Path(f"{output}.snapshot"), {"step.txt": f"{step}\n"})

    unet, text_encoder, tokenizer, _ = train_unet(recipe, vae, remaining, on_step=snapshot)
    t2 = time.perf_counter()
    recipe.log = {
        "vae_seconds": round(t1 - t0, 1),
        "unet_seconds": round(t2 - t1, 1),
        "scaling_factor": float(vae.config.scaling_factor),
        "torch": torch.__version__,
    }
    pipe = assemble(vae, text_encoder, tokenizer, unet).to(torch.float16)
    meta = asdict(recipe)
    meta["command"] = command
    _save_fp16(pipe, Path(output), {"recipe.json": json.dumps(meta, indent=2) + "\n"})
    return Path(output)
