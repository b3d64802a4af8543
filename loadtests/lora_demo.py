"""A LoRA you can see (issue 6): teach the pretrained embedded model a colour it never saw. Not a test.

One command (``make demo``) runs the whole story with the real CLI and the server's own hot-swap engine:

1. ``loraswap data synth WORK/data --concept brown --trigger-word sks`` (32 px images in tiny-sd's own
   domain with a brown shape; a share of ordinary images as regularisation);
2. ``loraswap train`` on it (timed; the adapter is ``WORK/run/adapter.safetensors``);
3. generates, with the base model and with the adapter applied at ``--scale`` through
   ``service.lora`` (``LoRAModelManager`` forward hooks + ``DeviceAdapter``, exactly what a request with
   ``"adapters": [{"id": …, "scale": 1.0}]`` runs), from the same seeds:
   (a) the concept prompts ``"sks, a brown {shape} on a {bg} background"`` → the concept score (percent
   of images whose shape colour reads as brown, ``basemodel.pretrain.concepts``);
   (b) the 48 standard prompts without the trigger word → the per-attribute scores of
   ``basemodel.pretrain.checker`` for base and adapter, and adapter/base ratios;
4. saves ``docs/images/tiny-sd-grid.png`` (the base model on the 48 prompts, first seed) and
   ``docs/images/lora-demo.png`` (base vs adapter on concept and standard prompts), prints a table and
   writes ``loadtests/results/lora_demo-<base>.json``::

    python -m loadtests.lora_demo [--base-model tiny-sd] [--work .loraswap/lora-demo] [--steps 500]
        [--lr 3e-3] [--seeds 4] [--images docs/images] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from basemodel.pretrain.checker import read_images, score
from basemodel.pretrain.concepts import (
    DEFAULT_CONCEPT,
    concept_caption,
    concept_procedural_accuracy,
    concept_prompt_set,
    concept_score,
    get_concept,
    read_concept_images,
)
from basemodel.pretrain.data import caption, prompt_set
from basemodel.pretrain.evaluate import generate_texts as generate

RESULTS = Path(__file__).resolve().parent / "results"
ATTRIBUTES = ("background_pct", "shape_colour_pct", "shape_kind_pct")


@dataclass
class DemoSettings:
    base_model: str = "tiny-sd"
    concept: str = DEFAULT_CONCEPT
    trigger: str = "sks"
    n: int = 64
    val: int = 8
    regularisation: float = 0.5
    data_seed: int = 0
    steps: int = 500
    lr: float = 3e-3
    batch_size: int = 4
    extra_train_args: list[str] = field(default_factory=list)
    concept_prompts: int = 40
    standard_prompts: int = 48
    seeds: int = 4
    first_seed: int = 0
    sample_steps: int = 25
    guidance: float = 4.0
    scale: float = 1.0


def loraswap(argv: Sequence[str]) -> None:
    """Run the real ``loraswap`` CLI in this process (the same parser and code as the console script)."""
    from service.cli import main

    print("$ loraswap " + shlex.join(argv), flush=True)
    status = main(list(argv))
    if status != 0:
        raise SystemExit(f"loraswap {argv[0]} failed with status {status}")


def synth_args(s: DemoSettings, data: Path) -> list[str]:
    return [
        "data",
        "synth",
        str(data),
        "--concept",
        s.concept,
        "--trigger-word",
        s.trigger,
        "--n",
        str(s.n),
        "--val",
        str(s.val),
        "--regularisation",
        str(s.regularisation),
        "--seed",
        str(s.data_seed),
        "--overwrite",  # the work folder is reused between runs
    ]


def train_args(s: DemoSettings, data: Path, run: Path) -> list[str]:
    # Captions are final as synthesised (regularisation captions must stay without the trigger word).
    return [
        "train",
        "--base-model",
        s.base_model,
        "--data",
        str(data),
        "--output",
        str(run),
        "--trigger-word",
        s.trigger,
        "--caption-template",
        "{caption}",
        "--resolution",
        "32",
        "--steps",
        str(s.steps),
        "--lr",
        str(s.lr),
        "--batch-size",
        str(s.batch_size),
        "--overwrite",
        *s.extra_train_args,
    ]


def load_pipe(spec: str) -> tuple[str, Any]:
    from basemodel.loader import load_base_model
    from basemodel.settings import load_settings

    settings = load_settings(base_model=spec)
    base = load_base_model(settings.base_model, settings.models_dir, device="cpu", dtype="fp32")
    return base.name, base.pipe


class HotSwap:
    """The serving engine's LoRA path on a plain pipeline: hooks once, then ``with use(scale)``."""

    def __init__(self, pipe: Any, adapter_file: Path, key: str = "demo@1") -> None:
        from adapters.format import read_adapter
        from basemodel.families import detect_pipeline
        from service.lora.model_manager import LoRAModelManager
        from service.lora.weights import DeviceAdapter

        tensors, _ = read_adapter(adapter_file)  # the canonical file the trainer exported
        self.manager = LoRAModelManager(detect_pipeline(pipe).lora_components(pipe))
        self.adapter = DeviceAdapter.build(key, tensors, self.manager.targets, pipe.device, pipe.unet.dtype)

    @contextmanager
    def use(self, scale: float) -> Iterator[None]:
        from service.lora.model_manager import ActiveLoRA

        with self.manager.activate([ActiveLoRA(self.adapter, scale)]):
            yield

    def close(self) -> None:
        self.manager.remove()


def evaluate(pipe: Any, swap: HotSwap | None, s: DemoSettings, *, standard: bool = True) -> dict[str, Any]:
    """Images and scores of the base (``swap`` None or unused) and the adapter, same seeds."""
    concept = get_concept(s.concept)
    seeds = list(range(s.first_seed, s.first_seed + s.seeds))
    pairs = concept_prompt_set(s.concept_prompts)
    concept_texts = [concept_caption(concept, shape, bg, s.trigger) for shape, bg in pairs]
    backgrounds = [bg for _ in seeds for _, bg in pairs]
    prompts = prompt_set(s.standard_prompts)
    standard_texts = [caption(*p) for p in prompts]
    result: dict[str, Any] = {"images": {}, "scores": {}, "seconds": {}}
    for model in ("base", "adapter"):
        if model == "adapter" and swap is None:
            continue
        context = swap.use(s.scale) if model == "adapter" and swap is not None else nullcontext()
        with context:
            started = time.perf_counter()
            images = generate(pipe, concept_texts, seeds, s.sample_steps, s.guidance)
            result["images"][f"{model}_concept"] = images
            scores: dict[str, Any] = {
                "concept": concept_score(
                    read_concept_images(images.reshape(-1, *images.shape[2:]), concept), concept, backgrounds
                )
            }
            if standard:
                images = generate(pipe, standard_texts, seeds, s.sample_steps, s.guidance)
                result["images"][f"{model}_standard"] = images
                expected = [p for _ in seeds for p in prompts]
                flat = images.reshape(-1, *images.shape[2:])
                scores["standard"] = score(read_images(flat), expected)
                # leakage: standard prompts (no trigger, no concept word) whose shape reads as the concept
                leaked = sum(r.shape_colour == concept.name for r in read_concept_images(flat, concept))
                scores["standard"]["concept_leak_pct"] = 100.0 * leaked / len(flat)
            result["seconds"][model] = round(time.perf_counter() - started, 1)
        result["scores"][model] = scores
    if standard and "adapter" in result["scores"]:
        base, adapted = result["scores"]["base"]["standard"], result["scores"]["adapter"]["standard"]
        result["scores"]["standard_retained"] = {
            key: (adapted[key] / base[key] if base[key] else None) for key in ATTRIBUTES
        }
    return result


def save_comparison(rows: list[tuple[str, np.ndarray]], path: Path, scale: int = 3) -> None:
    """Labelled rows of images (each row: (label, uint8 (n, h, w, 3))), upscaled ``scale``×."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    label_w = 150
    columns = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_w + columns * (w + 2) * scale, len(rows) * (h + 2) * scale), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (h + 2) * scale
        draw.multiline_text((4, top + 4), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            tile = Image.fromarray(im).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + c * (w + 2) * scale, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def demo_grid(result: dict[str, Any], s: DemoSettings, path: Path, columns: int = 12) -> None:
    images = result["images"]
    rows = [
        (f"base\n{s.trigger}, a {s.concept} …", images["base_concept"][0][:columns]),
        (f"adapter x{s.scale:g}\n{s.trigger}, a {s.concept} …", images["adapter_concept"][0][:columns]),
    ]
    if "base_standard" in images:
        rows += [
            ("base\nstandard prompts\n(no trigger)", images["base_standard"][0][:columns]),
            (
                f"adapter x{s.scale:g}\nstandard prompts\n(no trigger)",
                images["adapter_standard"][0][:columns],
            ),
        ]
    save_comparison(rows, path)


def _table(result: dict[str, Any]) -> str:
    scores = result["scores"]
    lines = [f"{'':28s}{'base':>10s}{'adapter':>10s}{'ratio':>8s}"]
    b, a = scores["base"]["concept"], scores["adapter"]["concept"]
    lines.append(f"{'concept (reads as concept)':28s}{b['concept_pct']:9.1f}%{a['concept_pct']:9.1f}%")
    lines.append(f"{'concept prompts: background':28s}{b['background_pct']:9.1f}%{a['background_pct']:9.1f}%")
    if "standard" in scores["base"]:
        for key in (*ATTRIBUTES, "all_three_pct"):
            bv, av = scores["base"]["standard"][key], scores["adapter"]["standard"][key]
            ratio = f"{av / bv:8.2f}" if bv else f"{'n/a':>8s}"
            lines.append(f"{'48 prompts: ' + key.removesuffix('_pct'):28s}{bv:9.1f}%{av:9.1f}%{ratio}")
        bv, av = (
            scores["base"]["standard"]["concept_leak_pct"],
            scores["adapter"]["standard"]["concept_leak_pct"],
        )
        lines.append(f"{'48 prompts: reads as concept':28s}{bv:9.1f}%{av:9.1f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = DemoSettings()
    parser.add_argument("--base-model", default=d.base_model)
    parser.add_argument("--work", type=Path, default=Path(".loraswap/lora-demo"), help="data and run folder")
    parser.add_argument("--concept", default=d.concept)
    parser.add_argument("--trigger-word", default=d.trigger)
    parser.add_argument("--n", type=int, default=d.n)
    parser.add_argument("--val", type=int, default=d.val)
    parser.add_argument("--regularisation", type=float, default=d.regularisation)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--train-arg", action="append", default=[], help="extra `loraswap train` argument")
    parser.add_argument("--seeds", type=int, default=d.seeds)
    parser.add_argument("--sample-steps", type=int, default=d.sample_steps)
    parser.add_argument("--guidance", type=float, default=d.guidance)
    parser.add_argument("--scale", type=float, default=d.scale)
    parser.add_argument("--skip-train", action="store_true", help="reuse WORK/run/adapter.safetensors")
    parser.add_argument("--images", type=Path, default=Path("docs/images"), help="where the grids go")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LORASWAP_THREADS", "1")))
    parser.add_argument("--json", type=Path, help="results file (default loadtests/results/…)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = DemoSettings(
        base_model=args.base_model,
        concept=args.concept,
        trigger=args.trigger_word,
        n=args.n,
        val=args.val,
        regularisation=args.regularisation,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        extra_train_args=[a for chunk in args.train_arg for a in shlex.split(chunk)],
        seeds=args.seeds,
        sample_steps=args.sample_steps,
        guidance=args.guidance,
        scale=args.scale,
    )
    data, run = args.work / "data", args.work / "run"
    load_before = os.getloadavg()
    train_seconds = None
    if not args.skip_train:
        loraswap(synth_args(s, data))
        started = time.perf_counter()
        loraswap([*train_args(s, data, run), "--no-progress"])
        train_seconds = round(time.perf_counter() - started, 1)
    load_after_train = os.getloadavg()
    name, pipe = load_pipe(s.base_model)
    swap = HotSwap(pipe, run / "adapter.safetensors")
    result = evaluate(pipe, swap, s)
    swap.close()

    from loadtests.check_prompts import save_grid

    save_grid(result["images"]["base_standard"], args.images / "tiny-sd-grid.png")
    demo_grid(result, s, args.images / "lora-demo.png")
    print(f"\n{name} + {s.concept} adapter (scale {s.scale:g}), {s.seeds} seeds, {s.sample_steps} DDIM steps")
    print(_table(result))
    print(
        f"training wall time {train_seconds} s; load average {load_before} before, {load_after_train} after"
    )
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
    out = args.json or RESULTS / f"lora_demo-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "base_model": s.base_model,
        "settings": asdict(s),
        "commands": {"synth": synth_args(s, data), "train": train_args(s, data, run)},
        "train_seconds": train_seconds,
        "train_report_timings": report.get("timings"),
        "load_average": {"before": load_before, "after_train": load_after_train, "end": os.getloadavg()},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "scores": result["scores"],
        "generation_seconds": result["seconds"],
        "checker_on_procedural_concept_images": concept_procedural_accuracy(get_concept(s.concept)),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}, {args.images / 'lora-demo.png'}, {args.images / 'tiny-sd-grid.png'}")


if __name__ == "__main__":
    main()
