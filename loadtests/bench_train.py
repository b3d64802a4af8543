"""Training benchmark (issue 5): loraswap's trainer against a plain diffusers + peft loop, one run.

Not a test. It prints a table and writes what it measured to
``loadtests/results/bench_train-<device>[-quick].json``::

    python -m loadtests.bench_train [--device cpu|cuda] [--steps 40] [--repeats 3] [--quick]

Fixed config (both sides): the embedded tiny-sd at its native 64 px, a synthetic 32-image dataset
(``loraswap data synth --style sunset``), batch 4, LoRA rank 8 / alpha 8 (gaussian init) on
``to_q, to_k, to_v, to_out.0`` of the UNet, AdamW lr 1e-4 / weight decay 1e-2, constant LR, fp32,
grad-norm clipping 1.0, epsilon objective, seed 0, no validation/sampling inside the timed loop.

* **loraswap**: ``training.run.train`` — latents (VAE mean/std) and text embeddings encoded once before
  the loop, a fresh latent sampled from the cached distribution each step.
* **diffusers + peft**: what ``examples/text_to_image/train_text_to_image_lora.py`` does per step, with
  no caching: open + resize + center-crop + normalise each image, ``vae.encode(...).latent_dist.sample()``,
  ``text_encoder(input_ids)``, noise, ``unet`` forward/backward, clip, AdamW step. LoRA added with
  ``unet.add_adapter(LoraConfig(...))`` exactly as the script does.

Each variant runs in its own fresh process (``spawn``), variants alternate, ``--repeats`` times. Reported:
steps/s over the steps after ``--warmup`` (medians of repeats), setup time (load + encode, before the
first step), and peak memory: the process's peak RSS (``ru_maxrss``; whole process, model included)
and on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
RESOLUTION = 64
BATCH = 4
RANK = 8
LR = 1e-4
DATASET_SIZE = 32
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cuda_peak_mib(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / (1 << 20)


def _rate(step_times: list[float], warmup: int) -> float:
    """steps/s over the steps after ``warmup`` (``step_times[i]`` = wall clock at the end of step i+1)."""
    timed = step_times[warmup:]
    if len(timed) < 2:
        return float("nan")
    return (len(timed) - 1) / (timed[-1] - timed[0])


def run_loraswap(home: str, data: str, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Our trainer, timed from its own metrics (``elapsed_s`` per step)."""
    from training.config import build_config
    from training.run import train

    start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    config = build_config(
        {
            "data": data,
            "output": str(out),
            "resolution": RESOLUTION,
            "batch_size": BATCH,
            "steps": steps,
            "rank": RANK,
            "lr": LR,
            "val_split": 0.0,
            "validate_every": 0,
            "eval_samples": 0,
            "sample_steps": 1,
            "sample_seeds": [0],
            "sample_prompts": ["a gold circle"],
            "export": False,
            "progress": False,
            "device": device,
            "seed": 0,
        }
    )
    result = train(config, models_dir=Path(home) / "models", echo=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [float(r["elapsed_s"]) for r in rows if r["step"] >= 1]
    timings = (result.report or {}).get("timings_s", {})
    setup = sum(v for k, v in timings.items() if k not in ("train", "evaluate", "export"))
    return {
        "steps_per_s": _rate(elapsed, warmup),
        "setup_s": setup,
        "train_s": timings.get("train"),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": _peak_rss_mib(),
        "cuda_peak_mib": _cuda_peak_mib(device),
        "final_train_loss": rows[-1]["train_loss"],
    }


def run_diffusers(home: str, data: str, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """The diffusers example script's loop (no caching), on the same model, data and hyperparameters."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    torch.manual_seed(0)
    model = Path(home) / "models" / "tiny-sd"
    dev = torch.device(device)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder: Any = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_encoder.to(dev)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(dev)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(dev)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    files = sorted(Path(data).glob("*.png"))
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]

    def preprocess(path: Path) -> torch.Tensor:  # Resize + CenterCrop + ToTensor + Normalize([0.5], [0.5])
        img = Image.open(path).convert("RGB")
        scale = RESOLUTION / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        left, top = (img.width - RESOLUTION) // 2, (img.height - RESOLUTION) // 2
        img = img.crop((left, top, left + RESOLUTION, top + RESOLUTION))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    setup = time.perf_counter() - start
    unet.train()
    step_times: list[float] = []
    cached_work = 0.0  # seconds (after warm-up) spent on what loraswap does once: decode, VAE, text encoder
    generator = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    while len(step_times) < steps:
        order = torch.randperm(len(files), generator=generator).tolist()
        for begin in range(0, len(order), BATCH):
            if len(step_times) >= steps:
                break
            idx = order[begin : begin + BATCH]
            t0 = time.perf_counter()
            pixel_values = torch.stack([preprocess(files[i]) for i in idx]).to(dev)
            input_ids = tokenizer(
                [captions[i] for i in idx],
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(dev)
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if len(step_times) >= warmup:
                cached_work += time.perf_counter() - t0
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=dev
            )
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())
    return {
        "steps_per_s": _rate(step_times, warmup),
        "setup_s": setup,
        "train_s": step_times[-1] - (start + setup),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": _peak_rss_mib(),
        "cuda_peak_mib": _cuda_peak_mib(device),
        "final_train_loss": float(loss.detach()),
        "cached_work_share": cached_work / max(1e-9, step_times[-1] - step_times[warmup - 1])
        if warmup >= 1
        else None,
    }


VARIANTS = {"loraswap (cached latents)": run_loraswap, "diffusers + peft (no caching)": run_diffusers}


def _child(name: str, args: tuple[Any, ...], queue: Any) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        queue.put(("ok", VARIANTS[name](*args)))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure(name: str, args: tuple[Any, ...]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{name} failed: {value}")
    return dict(value)


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers
        import peft

        info |= {"diffusers": diffusers.__version__, "peft": peft.__version__}
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from steps/s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="12 steps, 1 repeat (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 12, 2, 1
    from basemodel.tiny import ensure_tiny
    from training.data.synth import synth_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ensure_tiny(work / "models")
    synth_dataset(work / "data", n=DATASET_SIZE, style="sunset", size=RESOLUTION, seed=0)
    call = (str(work), str(work / "data"), args.steps, args.warmup, args.device)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name in VARIANTS:
            result = measure(name, call)
            samples[name].append(result)
            print(
                f"  repeat {repeat + 1}/{args.repeats} {name}: {result['steps_per_s']:.2f} steps/s",
                flush=True,
            )

    def median(name: str, key: str) -> Any:
        """The median over repeats, None where no repeat measured it (CUDA memory on CPU)."""
        values = [s[key] for s in samples[name] if s.get(key) is not None]
        return statistics.median(values) if values else None

    summary: dict[str, dict[str, Any]] = {
        name: {k: median(name, k) for k in samples[name][0]} for name in VARIANTS
    }
    ours, base = (summary[n] for n in VARIANTS)
    ratio = {
        "steps_per_s": ours["steps_per_s"] / base["steps_per_s"],
        "peak_rss": ours["peak_rss_mib"] / base["peak_rss_mib"],
    }
    if ours.get("cuda_peak_mib") and base.get("cuda_peak_mib"):
        ratio["cuda_peak"] = ours["cuda_peak_mib"] / base["cuda_peak_mib"]
    header = f"{'variant':32} {'steps/s':>8} {'ms/step':>8} {'setup s':>8} {'peak RSS MiB':>13}"
    if args.device == "cuda":
        header += f" {'CUDA peak MiB':>14}"
    print(
        f"\ntiny-sd {RESOLUTION}px, batch {BATCH}, rank {RANK}, {args.steps} steps ({args.warmup} warm-up), "
        f"median of {args.repeats}, device {args.device}"
    )
    print(header)
    for name, row in summary.items():
        rate = row["steps_per_s"]
        line = f"{name:32} {rate:8.2f} {1000 / rate:8.1f} {row['setup_s']:8.2f} {row['peak_rss_mib']:13.0f}"
        if args.device == "cuda":
            line += f" {row['cuda_peak_mib']:14.0f}"
        print(line)
    label = "ratio loraswap / diffusers"
    print(f"{label:32} {ratio['steps_per_s']:7.2f}x {'':8} {'':8} {ratio['peak_rss']:12.2f}x")
    share = base.get("cached_work_share")
    if share is not None:
        print(
            f"the baseline spends {100 * share:.1f} % of its step time on image decoding, VAE encoding and "
            f"the text encoder, which loraswap does once (at most {1 / (1 - share):.2f}x from caching here)"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_train-{args.device}{'-quick' if args.quick else ''}.json"
    record = {
        "benchmark": "bench_train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(args.device),
        "config": {
            "model": "tiny-sd",
            "resolution": RESOLUTION,
            "batch_size": BATCH,
            "rank": RANK,
            "lr": LR,
            "targets": TARGETS,
            "dataset_size": DATASET_SIZE,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "summary": summary,
        "ratio": ratio,
        "samples": samples,
    }
    path.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
