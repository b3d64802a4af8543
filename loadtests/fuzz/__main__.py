"""``python -m loadtests.fuzz adapters|api|all``: the full fuzz runs, a table each and a JSON report.

    python -m loadtests.fuzz adapters --cases 10000 [--families header,json] [--seed 12]
    python -m loadtests.fuzz api --examples 100 [--only 'POST /v1/generate'] [--seed 12]
    python -m loadtests.fuzz all --cases 10000 --examples 100

Everything runs in this process against loopback: tiny-sd in a temporary home (``--home`` to reuse
one), local stores in a temporary folder, moto's S3 server. The JSON goes to
``loadtests/results/fuzz-<suite>.json`` (git-ignored) unless ``--out`` says otherwise. Exit status 1
when a failure is not a known unfixed defect (``loadtests/fuzz/known.py``), or with ``--strict`` on any
failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis.configuration import set_hypothesis_home_dir

from loadtests.fuzz.known import ADAPTER_DEFECTS, API_DEFECTS, unfixed
from loadtests.fuzz.report import write_json

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=["adapters", "api", "all"])
    parser.add_argument("--cases", type=int, default=10_000, help="adapter files (default 10000)")
    parser.add_argument("--families", default="", help="adapter mutation families, comma-separated")
    parser.add_argument("--examples", type=int, default=100, help="API cases per operation and mode")
    parser.add_argument("--auth-examples", type=int, default=5, help="API cases per operation and role")
    parser.add_argument("--only", action="append", default=[], help="API operation 'METHOD /path'")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--home", type=Path, default=None, help="LORASWAP_HOME to build tiny-sd in")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (one suite)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any failure, known or not")
    parser.add_argument("--verbose", action="store_true", help="keep the server's error tracebacks")
    return parser.parse_args(argv)


def run_adapters(args: argparse.Namespace, home: Path) -> tuple[dict[str, Any], int, int]:
    from adapters.identity import BaseIdentity
    from basemodel.tiny import ensure_tiny
    from loadtests.fuzz.adapters import FAMILIES, run, run_reproducers

    ensure_tiny(home / "models")
    base = BaseIdentity.from_spec("tiny-sd", home / "models")
    families = [f for f in args.families.split(",") if f] or list(FAMILIES)
    report = run(base, cases=args.cases, families=families, seed=args.seed, workdir=home)
    print(f"\nadapters: {len(report.results)} cases in {report.seconds:.1f} s (seed {args.seed})\n")
    print(report.summary())
    reproduced = run_reproducers(base, home)
    print("\nknown-defect reproducers:")
    for key, result in reproduced.items():
        print(f"  {key:<22} {result.kind:<16} {result.detail[:90]}")
    data = report.to_json() | {"reproducers": {k: [r.kind, r.detail] for k, r in reproduced.items()}}
    return data, len(report.failures()), len(report.unexplained(unfixed(ADAPTER_DEFECTS)))


def run_api_suite(args: argparse.Namespace, home: Path) -> tuple[dict[str, Any], int, int]:
    from basemodel.loader import load_base_model
    from basemodel.tiny import ensure_tiny
    from loadtests.fuzz.api import run_api
    from loadtests.fuzz.server import fuzz_target

    if not args.verbose:
        logging.getLogger("service.errors").setLevel(logging.CRITICAL)
    ensure_tiny(home / "models")
    base = load_base_model("tiny-sd", home / "models", device="cpu", dtype="fp32")
    with fuzz_target(base, home) as target:
        report = run_api(
            target, examples=args.examples, seed=args.seed, auth_examples=args.auth_examples, only=args.only
        )
    print(f"\napi: {len(report.calls)} calls in {report.seconds:.1f} s (seed {args.seed})\n")
    print(report.summary())
    return report.to_json(), len(report.failures()), len(report.unexplained(unfixed(API_DEFECTS)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    suites = ["adapters", "api"] if args.suite == "all" else [args.suite]
    status = 0
    with tempfile.TemporaryDirectory(prefix="loraswap-fuzz-home-") as tmp:
        home = args.home or Path(tmp)
        set_hypothesis_home_dir(Path(tmp) / "hypothesis")  # its caches: never in the checkout
        for suite in suites:
            runner = run_adapters if suite == "adapters" else run_api_suite
            data, failures, unexplained = runner(args, home)
            out = args.out if args.out and len(suites) == 1 else RESULTS_DIR / f"fuzz-{suite}.json"
            write_json(out, data)
            print(f"\n{suite}: {failures} failure(s), {unexplained} not a known defect; JSON: {out}")
            if unexplained or (args.strict and failures):
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
