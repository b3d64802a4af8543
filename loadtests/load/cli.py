"""``python -m loadtests.load``: arguments, the run, the table and the JSON."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from basemodel.tiny import ensure_tiny
from loadtests.bench_swap.cli import write_json
from loadtests.bench_swap.config import RESULTS_DIR
from loadtests.bench_swap.machine import loadavg, log, quiet_libraries
from loadtests.load import SUMMARY
from loadtests.load.phases import Load
from loadtests.load.report import table, verdict_lines, verdicts
from loadtests.load.server import ServerOptions
from loadtests.load.suite import Outcome, Plan, run_suite

# (full run, --quick)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "users": ("1,2,4,8", "1,2"),
    "multiples": ("1,2,4,8", "1,8"),
    "ramp_seconds": (20, 3),
    "phase_seconds": (30, 4),
    "compare_rounds": (4, 1),
    "compare_seconds": (15, 4),
    "soak_minutes": (3.0, 0.15),
    "warmup_seconds": (3.0, 1.0),
    "rss_interval": (2.0, 1.0),
}


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.load", description=SUMMARY)
    p.add_argument("--quick", action="store_true", help="a ≤ ~60 s run: short phases, a 9 s soak")
    p.add_argument("--users", type=int_list, help="ramp: users per step (default 1,2,4,8; quick 1,2)")
    p.add_argument(
        "--multiples", type=int_list, help="× saturation users to run at (default 1,2,4,8; quick 1,8)"
    )
    p.add_argument("--saturation", type=int, help="saturating users, instead of the ramp's verdict")
    p.add_argument("--ramp-seconds", type=int, help="seconds per ramp step (default 20; quick 3)")
    p.add_argument("--phase-seconds", type=int, help="seconds per ×m phase (default 30; quick 4)")
    p.add_argument("--compare-rounds", type=int, help="base/Zipf pairs, alternating (default 4; quick 1)")
    p.add_argument("--compare-seconds", type=int, help="seconds per compare phase (default 15; quick 4)")
    p.add_argument("--soak-minutes", type=float, help="soak length; 0 skips it (default 3)")
    p.add_argument("--warmup-seconds", type=float, help="left out at the start of every phase (3; quick 1)")
    p.add_argument(
        "--rss-interval", type=float, help="seconds between RSS (and CUDA memory) samples (2; quick 1)"
    )
    p.add_argument("--rss-bound", type=float, default=1.0, help="allowed RSS slope, MiB/min (1.0)")
    p.add_argument(
        "--cuda-bound", type=float, default=1.0, help="allowed allocated CUDA memory slope, MiB/min (1.0)"
    )
    p.add_argument("--adapters", type=int, default=50, help="adapters registered (50)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of the adapter mix (1.1)")
    p.add_argument("--base-share", type=float, default=0.1, help="share of requests with no adapter (0.1)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per request (4)")
    p.add_argument("--size", type=int, default=32, help="image width and height (32)")
    p.add_argument("--max-queue", type=int, default=2, help="the server's LORASWAP_MAX_QUEUE (2)")
    p.add_argument("--device-cache-mb", type=int, default=2, help="device cache tier, MB (2: ~12 of 50)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="the server's 504 deadline (30 s)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS; 1)")
    p.add_argument("--out", type=Path, help="JSON results (default loadtests/results/load[-quick].json)")
    p.add_argument("--workdir", type=Path, help="keep the server log, records and locust CSVs here")
    args = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            value = quick if args.quick else full
            setattr(args, name, int_list(value) if name in ("users", "multiples") else value)
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(
        adapters=args.adapters,
        ramp_users=args.users,
        ramp_seconds=args.ramp_seconds,
        multiples=args.multiples,
        phase_seconds=args.phase_seconds,
        compare_rounds=args.compare_rounds,
        compare_seconds=args.compare_seconds,
        soak_seconds=round(args.soak_minutes * 60),
        warmup_s=args.warmup_seconds,
        rss_interval_s=args.rss_interval,
        saturation=args.saturation,
    )


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` (the server's stop) runs."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def work_folder(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="loraswap-load-") as folder:
        yield Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    out = args.out or RESULTS_DIR / f"load{'-quick' if args.quick else ''}.json"
    load = Load([], args.zipf_s, args.base_share, args.steps, args.size)
    started, load_start = time.monotonic(), loadavg()
    try:
        with sigterm_as_interrupt(), work_folder(args.workdir) as workdir:
            ensure_tiny(workdir / "home" / "models")
            options = ServerOptions(
                workdir / "home", args.max_queue, args.device_cache_mb, args.request_timeout, args.threads
            )
            outcome = run_suite(plan_of(args), load, options, workdir)
    except KeyboardInterrupt:
        log("interrupted; the server and locust were stopped")
        return 130
    judged = verdicts(outcome.phases, outcome.post_check, args.rss_bound, args.cuda_bound)
    document = describe(args, argv, outcome, judged)
    document["meta"].update(wall_s=round(time.monotonic() - started, 1), load_average_start=load_start)
    write_json(out, document)
    print_report(document, outcome, judged, out)
    return 0 if judged["passed"] else 1


def describe(
    args: argparse.Namespace, argv: Sequence[str] | None, outcome: Outcome, judged: dict[str, Any]
) -> dict[str, Any]:
    phases = [asdict(p) for p in outcome.phases]
    return {
        "meta": {
            "command": "python -m loadtests.load " + shlex.join(sys.argv[1:] if argv is None else argv),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "load_average_end": loadavg(),
            "versions": {name: metadata.version(name) for name in ("locust", "torch", "diffusers")},
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server": outcome.server,
        "saturation_users": outcome.saturation_users,
        "phases": phases,
        "compare": outcome.compare,
        "post_check": outcome.post_check,
        "verdicts": judged,
    }


def print_report(document: dict[str, Any], outcome: Outcome, judged: dict[str, Any], out: Path) -> None:
    meta = document["meta"]
    settings = document["settings"]
    print(
        f"\nload suite on {meta['machine']['cpu_count']} CPUs, load average {meta['load_average_start']} → "
        f"{meta['load_average_end']}, {meta['wall_s']} s"
    )
    print(
        f"tiny-sd {settings['size']} px × {settings['steps']} steps; {settings['adapters']} adapters, "
        f"Zipf({settings['zipf_s']}) + {settings['base_share']:.0%} base; max_queue {settings['max_queue']}; "
        f"saturation at {outcome.saturation_users} users"
    )
    print(table(outcome.phases, outcome.compare))
    for line in verdict_lines(judged):
        print(line)
    print(f"results: {out}")
    log("done")
