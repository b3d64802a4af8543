"""One phase: a headless locust process for a fixed time against the server, and its figures.

Each phase is one ``python -m locust -f loadtests/load/locustfile.py --headless -u N -r N -t Ts --host
URL --csv DIR/NAME`` with the phase's settings in ``DIR/NAME.json`` (``LOADTEST_CONFIG``). It runs in
the run's temporary folder (its CSV files and records stay there, never in the repository) under a hard
time limit (``-t`` + 60 s, then it is killed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench_swap.machine import loadavg, log
from loadtests.load.stats import slope_mib_per_min, summarise

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
KILL_AFTER_S = 60.0  # beyond the phase's own duration
AGGREGATED = re.compile(r"^\s+Aggregated\s+(\d+)\s", re.MULTILINE)


@dataclass(frozen=True)
class Load:
    """What every user sends: the mix (``adapters`` most popular first) and the request."""

    adapters: list[str]
    zipf_s: float
    base_share: float
    steps: int
    size: int
    honour_retry_after: bool = True
    retry_after_cap_s: float = 10.0
    client_timeout_s: float = 120.0

    def base_only(self) -> Load:
        """The same requests naming no adapter."""
        return Load(**{**asdict(self), "adapters": [], "base_share": 1.0})


@dataclass
class Phase:
    name: str
    users: int
    seconds: int
    mix: str  # "zipf" or "base"
    figures: dict[str, Any]
    started: float  # wall clock: first request sent
    ended: float  # wall clock: last response
    load_average: dict[str, list[float]]
    locust: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, Any] = field(default_factory=dict)
    cuda: dict[str, Any] = field(default_factory=dict)  # the soak's allocated CUDA memory; {} off CUDA


def locust_command(url: str, users: int, seconds: int, csv_prefix: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url,
        "--csv", str(csv_prefix), "--only-summary", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip


def run_locust(
    url: str, load: Load, users: int, seconds: int, workdir: Path, name: str
) -> list[dict[str, Any]]:
    """Run one locust process; the records it wrote (one per response)."""
    records = workdir / f"{name}.jsonl"
    config = workdir / f"{name}.json"
    config.write_text(json.dumps({**asdict(load), "records": str(records)}))
    env = {**os.environ, "LOADTEST_CONFIG": str(config)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    command = locust_command(url, users, seconds, workdir / name)
    with (workdir / f"{name}.locust.log").open("wb") as out:
        done = subprocess.run(
            command,
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=seconds + KILL_AFTER_S,
        )
    if done.returncode != 0:
        tail = (workdir / f"{name}.locust.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust exited with {done.returncode} in phase {name}:\n{tail}")
    if not records.exists():
        return []
    return [json.loads(line) for line in records.read_text().splitlines() if line.strip()]


def locust_request_count(log_path: Path) -> int | None:
    """The request count of locust's own final summary (its first 'Aggregated' line), a cross-check of
    the records (its ``*_stats.csv`` is written periodically and can miss the last second)."""
    try:
        found = AGGREGATED.search(log_path.read_text(errors="replace"))
    except OSError:
        return None
    return int(found[1]) if found else None


@dataclass
class Runner:
    """Runs phases against one server; ``memory`` is the live ``samples`` of the memory sampler
    (``rss`` and, on CUDA, ``cuda_allocated``: (wall time, KiB))."""

    url: str
    workdir: Path
    warmup_s: float
    memory: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)

    def run(self, name: str, users: int, seconds: int, load: Load) -> Phase:
        log(f"phase {name}: {users} users × {seconds} s ({'base only' if not load.adapters else 'Zipf mix'})")
        before = loadavg()
        started = time.time()
        records = run_locust(self.url, load, users, seconds, self.workdir, name)
        figures = summarise(records, self.warmup_s)
        first = min((r["t"] for r in records), default=started)
        last = max((r["t"] + r["latency_s"] for r in records), default=time.time())
        phase = Phase(
            name=name,
            users=users,
            seconds=seconds,
            mix="zipf" if load.adapters else "base",
            figures=figures,
            started=first,
            ended=last,
            load_average={"start": before, "end": loadavg()},
            locust={
                "command": locust_command(self.url, users, seconds, self.workdir / name),
                "records": len(records),
                "locust_request_count": locust_request_count(self.workdir / f"{name}.locust.log"),
            },
            rss=self.rss_between(first, last),
        )
        self.phases.append(phase)
        log(
            f"  {figures['img_per_s']:.2f} img/s, p99 {figures['p99_s']:.3f} s, "
            f"429 {figures['status_429']}, other errors {figures['other_errors']}"
        )
        return phase

    def rss_between(self, start: float, end: float) -> dict[str, Any]:
        inside = [kib for t, kib in list(self.memory.get("rss", [])) if start <= t <= end]
        if not inside:
            return {}
        return {"start_mib": inside[0] / 1024, "end_mib": inside[-1] / 1024, "peak_mib": max(inside) / 1024}

    def soak(self, users: int, seconds: int, load: Load) -> Phase:
        phase = self.run("soak", users, seconds, load)
        phase.rss = {**phase.rss, **self.trend("rss", phase)}
        if "cuda_allocated" in self.memory:
            phase.cuda = self.trend("cuda_allocated", phase)
        return phase

    def trend(self, name: str, phase: Phase) -> dict[str, Any]:
        """The slope of the memory figure ``name`` over the phase's second half, and its samples."""
        samples = list(self.memory.get(name, []))
        start, end = phase.started, phase.ended
        during = [(round(t - start, 2), kib) for t, kib in samples if start <= t <= end]
        return {**slope_mib_per_min(samples, start, end, name), "samples_s_kib": during}
