"""Every GPU row of every shape in one command: ``make bench-gpu`` (``python -m loadtests.bench_gpu``).

Runs ``loadtests.bench_swap`` on CUDA for the SD1.5-, SDXL-, SD3.5-medium- and Flux-shaped models one
after another in this process, with sizes chosen so that the whole run fits 9 minutes on one H100
(``PLAN``: each shape's phases, size overrides and the seconds it is expected to take; a shape whose
expected time no longer fits the budget is skipped and recorded as such, never half-run). It writes
each shape's JSON (``bench_swap-<shape>-cuda.json``), ``bench_gpu.json`` (the run, each shape's status,
wall time and peak CUDA memory) and ``bench_gpu.md`` (the tables) under ``--output-dir``.

``--dry`` runs the same plan on the CPU with the tiny shapes (tiny, tiny-sdxl, tiny-sd3, tiny-flux) and
tiny sizes, in seconds: the test suite runs it, so the command works the day a GPU is lent.

CUDA specifics are the benchmark's own (``bench_swap``): fp16 for the UNet shapes and bf16 for the MMDiT
ones (``config.CUDA_DTYPES``), ``torch.cuda.synchronize`` around every timed call (``timing.sync``),
adapters built from pinned host memory with ``non_blocking`` copies (``DeviceAdapter.build``). Here:
the peak CUDA memory of each shape (reset before it) and the cache emptied after it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loadtests.bench_swap import cli

BUDGET_S = 540.0  # 9 minutes
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Step:
    """One shape's part of the run."""

    shape: str
    phases: str
    sizes: tuple[str, ...]  # ``--set`` overrides
    expected_s: float  # what it should take on one H100, model build included


# On one H100: the request rows at each model's own resolution and step count (SD1.5 512 px / 20,
# SDXL 1024 / 30: ``config.CUDA_OVERRIDES``; SD3.5 and Flux 1024 / 28), 3 rounds; cold load and warm
# switch at the default sizes (64 adapters, 1→64 resident); the mixed batch (sd15) and memory rows (the
# UNet shapes). The expected seconds are estimates (no H100 has run this yet), random weights drawn on
# the host the first time included; the run skips a shape whose estimate no longer fits the budget.
PLAN = (
    Step(
        "sd15",
        "cold,switch,request,mixed,memory",
        ("request_repeats=3", "mixed_repeats=1", "forward_repeats=3", "mem_swaps=1000"),
        90,
    ),
    Step("sdxl", "cold,switch,request,memory", ("request_repeats=3", "mem_swaps=200"), 200),
    Step("sd3", "cold,switch,request", ("request_px=1024", "request_steps=28", "request_repeats=3"), 120),
    Step("flux", "cold,switch,request", ("request_px=1024", "request_steps=28", "request_repeats=3"), 100),
)

# --dry: the rows every shape has, on the tiny shapes, CPU, tiny sizes (the mixed and memory phases, UNet
# shapes only, are exercised by tests/loadtests/test_bench_sdxl.py)
DRY_PHASES = "cold,switch,request"
DRY_SIZES = (
    "adapters=2",
    "warmup=0",
    "resident=1,2",
    "cold_repeats=1",
    "set_adapters_calls=1",
    "switch_loops=20",
    "switch_samples=1",
    "acquire_loops=5",
    "request_repeats=1",
    "request_steps=1",
    "request_px=32",
    "no_hooks=false",
)
DRY = {"sd15": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes and sizes (seconds)")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: loadtests/results/bench_gpu-…"
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (540)")
    parser.add_argument("--shapes", default=",".join(DRY), help="a subset of sd15,sdxl,sd3,flux")
    return parser.parse_args(argv)


def steps(args: argparse.Namespace) -> list[Step]:
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    plan = [step for step in PLAN if step.shape in wanted]
    if not args.dry:
        return plan
    return [Step(DRY[s.shape], DRY_PHASES, DRY_SIZES, 0) for s in plan]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or --dry for the CPU rehearsal", file=sys.stderr)
        return 2
    device = "cpu" if args.dry else "cuda"
    output = args.output_dir or RESULTS / ("bench_gpu-dry" if args.dry else "bench_gpu-cuda")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = []
    for step in steps(args):
        elapsed = time.perf_counter() - started
        if elapsed + step.expected_s > args.budget:
            runs.append(
                {"shape": step.shape, "status": f"skipped: {elapsed:.0f} s spent of {args.budget:.0f}"}
            )
            continue
        runs.append(run_step(step, device, args.dry, output))
    summary = {
        "meta": describe(device, args.dry, args.budget),
        "wall_s": round(time.perf_counter() - started, 1),
        "shapes": runs,
    }
    (output / "bench_gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "bench_gpu.md").write_text(markdown(summary, output))
    print(f"bench_gpu: {summary['wall_s']} s; " + ", ".join(f"{r['shape']} {r['status']}" for r in runs))
    print(f"JSON and tables: {output}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def run_step(step: Step, device: str, dry: bool, output: Path) -> dict[str, Any]:
    """One shape through ``bench_swap``'s CLI; its peak CUDA memory; the status (ok / phases failed /
    the exception)."""
    json_path = output / f"bench_swap-{step.shape}-{device}.json"
    argv = ["--shape", step.shape, "--device", device, "--only", step.phases, "--output", str(json_path)]
    argv += [arg for size in step.sizes for arg in ("--set", size)]
    if dry:
        argv += ["--quick", "--model-cache", str(output / "models")]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        code = cli.main(argv)
        status = "ok" if code == 0 else f"exit {code} (a phase failed: see its JSON)"
    except Exception as exc:  # one shape's failure (an OOM) must not sink the others
        status = f"error: {type(exc).__name__}: {exc}"
        (output / f"bench_swap-{step.shape}-{device}.error.txt").write_text(traceback.format_exc())
    result: dict[str, Any] = {
        "shape": step.shape,
        "status": status,
        "command": "python -m loadtests.bench_swap " + " ".join(argv),
        "wall_s": round(time.perf_counter() - started, 1),
        "json": json_path.name,
    }
    if device == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def describe(device: str, dry: bool, budget: float) -> dict[str, Any]:
    meta: dict[str, Any] = {"device": device, "dry": dry, "budget_s": budget, "torch": torch.__version__}
    meta["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
    return meta


def markdown(summary: dict[str, Any], output: Path) -> str:
    """Each shape's table (from its JSON) under a heading with its status and wall time."""
    meta = summary["meta"]
    lines = [
        f"# bench_gpu ({'dry, CPU' if meta['dry'] else meta.get('gpu', 'cuda')}), {summary['wall_s']} s",
        "",
    ]
    for run in summary["shapes"]:
        lines.append(
            f"## {run['shape']}: {run['status']}" + (f", {run['wall_s']} s" if "wall_s" in run else "")
        )
        lines.append("")
        path = output / run.get("json", "")
        if run.get("json") and path.is_file():
            lines += [f"`{run['command']}`", "", json.loads(path.read_text())["table"], ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
