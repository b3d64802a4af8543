"""``python -m loadtests.bench_swap``: the arguments, the run (setup, each phase), the table, the JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import SUMMARY
from .cold import bench_cold
from .config import CUDA_DTYPES, CUDA_OVERRIDES, MIB, MODEL_CACHE, RESULTS_DIR, SHAPES, SIZES, Sizes
from .fixtures import Bench, build_bench
from .machine import loadavg, log, peak_rss_bytes, quiet_libraries, rss_bytes
from .memory import bench_memory
from .mixed import bench_mixed
from .paths import bench_paths
from .preload import bench_preload
from .report import TARGETS, render, table_rows
from .request import bench_request
from .switch import bench_switch
from .unet_step import bench_unet_step

PHASES: dict[str, Callable[[Bench], None]] = {
    "cold": bench_cold,
    "switch": bench_switch,
    "unet_step": bench_unet_step,
    "request": bench_request,
    "mixed": bench_mixed,
    "memory": bench_memory,
    "paths": bench_paths,
    "preload": bench_preload,
}

# The MMDiT shapes' rows (issue 19): cold load, warm switch, request overhead on the fused path. The
# other phases call ``pipe.unet`` directly (unet_step, memory, paths) and stay UNet-only for now.
MMDIT_PHASES = ("cold", "switch", "request")
DEFAULT_PHASES = {shape: MMDIT_PHASES for shape in ("flux", "sd3", "tiny-flux", "tiny-sd3")}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PROMPT_PHASES = {"request", "mixed"}  # the phases that encode prompts (the others call the UNet directly)


@dataclass(frozen=True)
class Run:
    """What the arguments resolve to."""

    shape: str
    quick: bool
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    phases: list[str]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_swap", description=SUMMARY)
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    parser.add_argument(
        "--adapters", type=int, default=None, help="adapter files to generate (default per shape)"
    )
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run with tiny sizes")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated phases to run (default: all of {','.join(PHASES)}; the MMDiT shapes "
        f"{','.join(DEFAULT_PHASES)}: {','.join(MMDIT_PHASES)})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SIZE=VALUE",
        help="override one of the shape's sizes (config.Sizes), e.g. --set request_steps=4 (repeatable)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on CPU: 1 — on a shared machine oversubscribed OpenMP threads made "
        "every number 3-4× slower and noisy; on CUDA: torch's default)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="the run dtype (default: float32 on a CPU; on CUDA float16 for the UNet shapes, bfloat16 "
        "for the MMDiT ones). float16 on a CPU halves the model and our adapters for the phases that run "
        "no forward (cold, switch): how SD3.5 medium with 64 resident adapters fits 24 GiB",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: loadtests/results/…)")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=MODEL_CACHE,
        help="where the sdxl shapes keep their random fp16 weights, keyed by configs and seed "
        "(default: loadtests/results/models)",
    )
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> Run | str:
    """The device, dtype, torch threads, sizes and phases the arguments ask for, or why they can't be."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    sizes = SIZES[(args.shape, args.quick)]
    if device.type == "cuda" and not args.quick:
        sizes = replace(sizes, **CUDA_OVERRIDES.get(args.shape, {}))
    if args.adapters is not None:
        if args.adapters < 2:
            return "--adapters must be at least 2"
        sizes = replace(sizes, adapters=args.adapters)
    sizes_or_error = override_sizes(sizes, args.set)
    if isinstance(sizes_or_error, str):
        return sizes_or_error
    sizes = sizes_or_error
    if device.type == "cuda":
        dtype = CUDA_DTYPES.get(args.shape, dtype)
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
    only = args.only or ",".join(DEFAULT_PHASES.get(args.shape, PHASES))
    phases = [p.strip() for p in only.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        return f"unknown phase(s) {unknown}; choose from {list(PHASES)}"
    return Run(args.shape, args.quick, device, dtype, sizes, phases)


def override_sizes(sizes: Sizes, settings: Sequence[str]) -> Sizes | str:
    """``sizes`` with ``NAME=VALUE`` overrides, each value parsed as the field's current type."""
    fields = asdict(sizes)
    changes: dict[str, Any] = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        if name not in fields or not text:
            return f"--set {setting!r}: expected NAME=VALUE with NAME one of {sorted(fields)}"
        current = fields[name]
        try:
            if isinstance(current, bool):
                changes[name] = text.lower() in ("1", "true", "yes")
            elif isinstance(current, tuple):
                changes[name] = tuple(int(v) for v in text.split(",") if v)
            else:
                changes[name] = type(current)(text)
        except ValueError:
            return f"--set {setting!r}: {text!r} is not a {type(current).__name__}"
    return replace(sizes, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    run = configure(args)
    if isinstance(run, str):
        print(run, file=sys.stderr)
        return 2

    started = time.perf_counter()
    meta = describe_run(run, sys.argv[1:] if argv is None else argv)
    rss_start = rss_bytes()
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        bench, described = build_bench(
            run.shape,
            run.sizes,
            run.device,
            run.dtype,
            Path(tmp),
            model_cache=args.model_cache,
            prompts=bool(PROMPT_PHASES & set(run.phases)),
        )
        meta.update(
            described,
            sizes=asdict(run.sizes),
            rss_at_start_bytes=rss_start,
            rss_after_setup_bytes=rss_bytes(),
            peak_rss_after_setup_bytes=peak_rss_bytes(),
            setup_s=round(time.perf_counter() - started, 2),
        )
        log(f"setup done in {meta['setup_s']} s ({meta['lora_modules']} LoRA modules)")
        suffix = "-quick" if run.quick else ""
        output = args.output or RESULTS_DIR / f"bench_swap-{run.shape}-{run.device.type}{suffix}.json"
        for name in run.phases:
            PHASES[name](bench)
            # what has been measured so far, in case a long run is stopped ("complete": false until the end)
            partial = {"meta": meta | {"complete": False}, "targets": TARGETS, "results": bench.results}
            write_json(output, partial | {"table": render(table_rows(bench.results, run.device))})
        bench.manager.remove()

    meta["load_average_end"] = loadavg()
    meta["peak_rss_bytes"] = peak_rss_bytes()
    meta["wall_s"] = round(time.perf_counter() - started, 2)
    meta["complete"] = True
    table = render(table_rows(bench.results, run.device))
    write_json(output, {"meta": meta, "targets": TARGETS, "results": bench.results, "table": table})
    print_summary(run, meta, table)
    failed = [name for name, out in bench.results.items() if "error" in out]
    for name in failed:
        print(f"\nphase {name} failed:\n{bench.results[name]['error']}")
    print(f"\nJSON: {output}")
    return 1 if failed else 0


def describe_run(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    """The run's settings, the machine and the library versions (the JSON's ``meta``, before setup)."""
    import diffusers
    import peft
    import transformers

    meta: dict[str, Any] = {
        "shape": run.shape,
        "device": str(run.device),
        "dtype": str(run.dtype).removeprefix("torch."),
        "quick": run.quick,
        "command": "python -m loadtests.bench_swap " + " ".join(argv),
        "load_average_start": loadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
    }
    if run.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(run.device)
    return meta


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path | torch.device | torch.dtype):
        return str(value)
    return value


def write_json(output: Path, document: dict[str, Any]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(jsonable(document), indent=2) + "\n")


def print_summary(run: Run, meta: dict[str, Any], table: str) -> None:
    sizes = run.sizes
    print(
        f"\nbench_swap --shape {run.shape} on {run.device} ({meta['dtype']}); {meta['cpu_count']} CPUs; "
        f"load average {meta['load_average_start']} → {meta['load_average_end']}; {meta['wall_s']} s"
    )
    print(
        f"adapters: {sizes.adapters} × rank {sizes.rank} on {meta['lora_modules']} modules, "
        f"{meta['adapter_file_bytes'] / MIB:.2f} MiB {sizes.file_dtype} each; "
        f"{meta['denoiser']} {meta['denoiser_params'] / 1e6:.0f}M params"
    )
    print(
        f"peak RSS {meta['peak_rss_bytes'] / MIB / 1024:.2f} GiB "
        f"(after setup {meta['rss_after_setup_bytes'] / MIB / 1024:.2f} GiB; per phase in the JSON)"
    )
    print(table)
