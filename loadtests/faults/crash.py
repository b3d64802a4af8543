"""kill -9 during registrations and uploads, then ``adapters/fsck.verify_store`` on what is left.

Scenarios, each against a local store and an S3 store (moto's server on 127.0.0.1):

* ``cli`` — ``loraswap adapters register`` subprocesses, SIGKILLed (1) at each crash point of the
  store writes: the blob's temp file written but not linked (local), the blob created, the record's
  temp file written (local), the record created (before the dedup index), the index written;
  (2) from outside at seeded random moments of the run; (3) at seeded random moments after the run's
  first store call (a timer thread in the child: mid-write, mid-fsync, mid-PUT included).
* ``server`` — a real ``loraswap serve`` with three clients over HTTP (multipart uploads, JSON
  registrations from an ``s3://`` source, and a slow chunked upload that is always mid-body), SIGKILLed
  at a seeded random moment while an upload is in flight, restarted, repeated.

After every kill the store must be consistent: every listed version opens with its recorded sha256, no
gaps, no number that ever named other content, no version lost that was seen or confirmed before;
only temporary files of the killed writer may remain. After the next writer opens the store (the next
CLI run, the restarted server) there must be no stray file at all, store temps and upload spool files
included. ``python -m loadtests.faults.crash [--quick] [--seed N] [--out FILE]``; exit 1 on problems.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.faults.crash_kit import ADAPTER_IDS, REPO, RUN_TIMEOUT_S, Tally, Target, make_targets
from loadtests.faults.crash_server import server_scenario
from loadtests.moto import moto_s3

# (store method, nth call): local stores write a temp file before each create/put.
LOCAL_POINTS = (("temp", 1), ("create", 1), ("temp", 2), ("create", 2), ("temp", 3), ("put", 1))
S3_POINTS = (("create", 1), ("create", 2), ("put", 1))


# -- the CLI scenarios ---------------------------------------------------------------------------------


def register_argv(target: Target, title: str) -> list[str]:
    metadata = json.dumps({"title": title})
    return ["adapters", "register", str(target.adapter_file), "--id", ADAPTER_IDS[0], "--metadata", metadata]


def start_cli(target: Target, argv: list[str], mode: str | None = None) -> subprocess.Popen[str]:
    """``loraswap <argv>``; with ``mode``, under ``crash_child`` (crash point, store-phase timer, measure)."""
    if mode is None:
        command = [sys.executable, "-m", "service.cli", *argv]
    else:
        code = "import sys; from loadtests.faults.crash import crash_child as c; c(sys.argv[1], sys.argv[2:])"
        command = [sys.executable, "-c", code, mode, *argv]
    return subprocess.Popen(
        command, cwd=REPO, env=target.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def crash_child(mode: str, argv: list[str]) -> None:
    """Run ``loraswap <argv>`` in this process, SIGKILLing it at a chosen moment of its store writes.

    ``temp:N`` / ``create:N`` / ``put:N``: right after the Nth call of that store method (``temp``: the
    local store's temporary file, written and fsynced but not yet linked). ``after:S``: S seconds after
    the first store call, from a timer thread — anywhere, mid-write included. ``measure``: no kill;
    print ``store_phase_s=`` (first store call to the end) on stderr.
    """
    from adapters.sources.local import LocalStore
    from adapters.sources.s3 import S3Store
    from service.cli import main

    kind, _, value = mode.partition(":")
    calls = {"n": 0}
    first: list[float] = []
    for cls in (LocalStore, S3Store):
        if kind in ("temp", "create", "put"):
            name = "_write_temp" if kind == "temp" else kind
            if hasattr(cls, name):
                setattr(cls, name, _killing_after(getattr(cls, name), int(value), calls))
        else:
            cls.list = _on_first_call(cls.list, first, float(value) if kind == "after" else None)  # type: ignore[method-assign]
    code = main(argv)
    if kind == "measure" and first:
        print(f"store_phase_s={time.monotonic() - first[0]:.4f}", file=sys.stderr)
    sys.exit(code)


def _killing_after(fn: Any, nth: int, calls: dict[str, int]) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapped


def _on_first_call(fn: Any, first: list[float], kill_after: float | None) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not first:
            first.append(time.monotonic())
            if kill_after is not None:
                timer = threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL))
                timer.daemon = True  # a run that ends first is not killed at exit
                timer.start()
        return fn(*args, **kwargs)

    return wrapped


def wait_cli(proc: subprocess.Popen[str], tally: Tally, timeout: float = RUN_TIMEOUT_S) -> str | None:
    """Wait for a run (up to ``timeout``, then SIGKILL it). Its stderr if it finished, None if killed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=RUN_TIMEOUT_S)
        return None
    if proc.returncode == -signal.SIGKILL:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"register failed (exit {proc.returncode}): {err[-2000:]}")
    record = json.loads(out)
    tally.registrations += 1
    tally.seen[record["ref"]] = record["sha256"]
    return err


@dataclass(frozen=True)
class CliPlan:
    """What ``cli_scenario`` does: crash points, then random kills from outside and inside the store phase."""

    points: tuple[tuple[str, int], ...] = ()
    external: int = 0  # SIGKILL from this process at a random moment of the run
    store_phase: int = 0  # SIGKILL at a random moment after the run's first store call
    calibrate: bool = True  # measure a run first (else assume STORE_PHASE_S)


STORE_PHASE_S = 0.05


def cli_scenario(target: Target, rng: random.Random, plan: CliPlan) -> dict[str, Any]:
    """SIGKILL ``loraswap adapters register`` as ``plan`` says; check after each kill and at the end."""
    tally = Tally("cli", target.name)

    def killed(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT_S) -> bool:
        if wait_cli(proc, tally, timeout) is not None:
            return False  # it finished first
        tally.kills += 1
        tally.check(target, after_restart=False, killed={})
        return True

    for kind, nth in plan.points:
        if not killed(start_cli(target, register_argv(target, f"point-{kind}-{nth}"), f"{kind}:{nth}")):
            raise RuntimeError(f"crash point {kind}:{nth} was never reached")
    run_s, phase_s = RUN_TIMEOUT_S, STORE_PHASE_S
    if plan.calibrate:
        started = time.monotonic()
        err = wait_cli(start_cli(target, register_argv(target, "calibrate"), "measure"), tally) or ""
        run_s = time.monotonic() - started
        phase_s = float(err.rsplit("store_phase_s=", 1)[-1].split()[0])
    for index in range(plan.external):
        killed(start_cli(target, register_argv(target, f"external-{index}")), run_s * rng.uniform(0.5, 1.05))
    for index in range(plan.store_phase):
        delay = phase_s * rng.uniform(0.0, 1.1)
        killed(start_cli(target, register_argv(target, f"phase-{index}"), f"after:{delay:.4f}"))
    wait_cli(start_cli(target, register_argv(target, "after-kills")), tally)  # the next writer sweeps
    tally.check(target, after_restart=True)
    return tally.row()


# -- entry points ----------------------------------------------------------------------------------------


def run(
    quick: bool,
    *,
    seed: int = 12,
    stores: tuple[str, ...] | None = None,
    workdir: Path | None = None,
    home: Path | None = None,
) -> list[dict[str, Any]]:
    """Every scenario; quick: the local store, one crash point, one store-phase and one server kill."""
    stores = stores or (("local",) if quick else ("local", "s3"))
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="loraswap-crash-") as scratch, moto_s3() as endpoint:
        work = workdir or Path(scratch)
        rows = []
        for target in make_targets(work, home or work / "home", endpoint, stores):
            if quick:
                plan = CliPlan(points=(("temp", 2),), store_phase=1, calibrate=False)
            else:
                points = LOCAL_POINTS if target.name == "local" else S3_POINTS
                plan = CliPlan(points=points, external=4, store_phase=12)
            rows.append(cli_scenario(target, rng, plan))
            rows.append(server_scenario(target, rng, kills=1 if quick else 5, workdir=work))
        return rows


COLUMNS = ("scenario", "store", "kills", "registrations", "versions", "orphan_blobs", "stray_after_kill",
           "spool_after_kill", "stray_after_restart", "problems", "seconds")  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.faults.crash", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a bounded run (local store, ~30 s)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.quick, seed=args.seed)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(row["problems"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
