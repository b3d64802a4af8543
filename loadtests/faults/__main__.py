"""``python -m loadtests.faults [--quick] [--seed N] [--out FILE]``: the whole fault suite in one run.

Runs the store-outage scenarios (``loadtests.faults.outage``: moto's S3 behind the fault proxy, a real
server) and then the kill -9 scenarios (``loadtests.faults.crash``: the CLI and the server SIGKILLed
during registrations and uploads, then a consistency check), prints each suite's table and writes one
JSON with both row lists and a summary (``loadtests/results/faults[-quick].json`` unless ``--out``
says otherwise). Exit status 1 when any scenario failed. ``--quick`` is about a minute on 2 cores, the
full run several minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.faults import crash, outage

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def run(quick: bool, seed: int) -> dict[str, Any]:
    """Both suites, one after the other; their rows and a summary (a crash row passes with no problem)."""
    started = time.monotonic()
    outage_rows = outage.run(quick)
    outage_s = time.monotonic() - started
    crash_rows = crash.run(quick, seed=seed)
    crash_s = time.monotonic() - started - outage_s
    failed = sum(not row["ok"] for row in outage_rows) + sum(bool(row["problems"]) for row in crash_rows)
    scenarios = len(outage_rows) + len(crash_rows)
    return {
        "suite": "faults",
        "quick": quick,
        "seed": seed,
        "outage": outage_rows,
        "crash": crash_rows,
        "summary": {
            "scenarios": scenarios,
            "passed": scenarios - failed,
            "failed": failed,
            "outage_s": round(outage_s, 1),
            "recovery_s": max((r["recovery_s"] for r in outage_rows if "recovery_s" in r), default=None),
            "crash_s": round(crash_s, 1),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.faults", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the bounded variant of both suites (~1 min)")
    parser.add_argument("--seed", type=int, default=12, help="kill moments of the kill -9 scenarios (12)")
    parser.add_argument("--out", type=Path, help="JSON (default loadtests/results/faults[-quick].json)")
    args = parser.parse_args(argv)
    outage.quiet_logs()
    document = run(args.quick, args.seed)
    print("store outages\n")
    print(outage.table(document["outage"]))
    print(f"\nrecovery after the store came back: {outage.recovery_summary(document['outage'])}")
    print("\nkill -9\n")
    print(crash.table(document["crash"]))
    summary = document["summary"]
    print(f"\n{summary['scenarios']} scenarios: {summary['passed']} passed, {summary['failed']} failed")
    out = args.out or RESULTS_DIR / f"faults{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {out}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
