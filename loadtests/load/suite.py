"""The whole run: a server, 50 adapters, then the phases — ramp, at and above saturation, compare, soak.

1. **ramp**: ``ramp_users`` one after another; saturation = the fewest users whose throughput reaches
   90 % of the best step (one worker thread runs one batch at a time, so throughput levels off once a
   job is always waiting), or the first step with 429s if that comes first; ``--saturation`` fixes it.
2. **×m**: ``m × saturation`` users for each multiple; where users exceed what the queue holds
   (``max_queue`` waiting + the batch running) the surplus gets 429 + ``Retry-After``.
3. **compare**: base-only requests against the Zipf mix at the saturating load, back to back in
   alternating order per round; ratios of throughput and p99 (the price of hot-swapping under load).
4. **soak**: ``soak_users`` (the largest multiple) for the soak time; the slope of the server's RSS
   (and, on CUDA, of its allocated CUDA memory) over its second half.
5. **post-check**: the queue drains, one more request succeeds, the server is alive; its error
   counters by type.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench_swap.machine import log
from loadtests.bench_swap.timing import median, rotated
from loadtests.load.adapters import register_adapters, write_adapters
from loadtests.load.phases import Load, Phase, Runner
from loadtests.load.server import MemorySampler, ServerOptions, ServerProcess, memory_probes, scrape
from loadtests.load.stats import ratio, saturation_users

DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Plan:
    adapters: int
    ramp_users: list[int]
    ramp_seconds: int
    multiples: list[int]
    phase_seconds: int
    compare_rounds: int
    compare_seconds: int
    soak_seconds: int
    warmup_s: float
    rss_interval_s: float
    saturation: int | None = None  # given: skip the ramp's verdict
    saturation_fraction: float = 0.9


@dataclass
class Outcome:
    server: dict[str, Any]
    saturation_users: int
    phases: list[Phase]
    compare: dict[str, Any]
    post_check: dict[str, Any]


def run_suite(plan: Plan, load: Load, options: ServerOptions, workdir: Path) -> Outcome:
    with ServerProcess(options, workdir / "server.log") as server:
        ready_s = server.wait_ready()
        log(f"server ready on {server.url} (pid {server.pid}) after {ready_s:.1f} s")
        files = write_adapters(options.home / "models", plan.adapters, workdir / "adapter-files")
        load = replace(load, adapters=register_adapters(server.url, files))
        log(f"registered {len(load.adapters)} adapters")
        probes = memory_probes(server.pid, server.url)
        log(f"sampling {', '.join(probes)} every {plan.rss_interval_s} s")
        with MemorySampler(probes, plan.rss_interval_s) as sampler:
            runner = Runner(server.url, workdir, plan.warmup_s, sampler.samples)
            outcome = drive(runner, plan, load)
            outcome.post_check = post_check(server)
        outcome.server = {
            "command": server.command,
            "ready_s": ready_s,
            "max_queue": options.max_queue,
            "device_cache_mb": options.device_cache_mb,
            "threads": options.threads,
            **{f"{name}_samples": len(samples) for name, samples in sampler.samples.items()},
        }
        return outcome


def drive(runner: Runner, plan: Plan, load: Load) -> Outcome:
    ramp = [runner.run(f"ramp-{users}", users, plan.ramp_seconds, load) for users in plan.ramp_users]
    saturating = plan.saturation or saturation_users(
        [(p.users, p.figures["img_per_s"], p.figures["status_429"]) for p in ramp], plan.saturation_fraction
    )
    log(f"saturation at {saturating} users{' (given)' if plan.saturation else ''}")
    for multiple in plan.multiples:
        runner.run(f"x{multiple}", multiple * saturating, plan.phase_seconds, load)
    compare = compare_mixes(runner, plan, load, saturating) if plan.compare_rounds > 0 else {}
    if plan.soak_seconds > 0:
        runner.soak(max(plan.multiples) * saturating, plan.soak_seconds, load)
    return Outcome({}, saturating, runner.phases, compare, {})


def compare_mixes(runner: Runner, plan: Plan, load: Load, users: int) -> dict[str, Any]:
    """Base-only vs the Zipf mix at ``users``, ``compare_rounds`` pairs in alternating order."""
    variants = [("base", load.base_only()), ("zipf", load)]
    per_round: list[dict[str, Phase]] = []
    for round_ in range(plan.compare_rounds):
        ran = {}
        for label, variant in rotated(round_, variants):
            ran[label] = runner.run(f"compare-{label}-{round_ + 1}", users, plan.compare_seconds, variant)
        per_round.append(ran)

    def ratios(key: str) -> list[float]:
        return [ratio(r["zipf"].figures[key], r["base"].figures[key]) for r in per_round]

    return {
        "users": users,
        "rounds": plan.compare_rounds,
        "img_per_s_ratio": median(ratios("img_per_s")),  # zipf / base, median of the per-round ratios
        "p99_ratio": median(ratios("p99_s")),
        "per_round": [
            {"img_per_s_ratio": a, "p99_ratio": b}
            for a, b in zip(ratios("img_per_s"), ratios("p99_s"), strict=True)
        ],
    }


def post_check(server: ServerProcess) -> dict[str, Any]:
    """After the load: the queue drains, a request with an adapter succeeds, the server's counters."""
    drained_s = wait_drained(server.url)
    with httpx.Client(base_url=server.url, timeout=DRAIN_TIMEOUT_S) as http:
        started = time.monotonic()
        response = http.post(
            "/v1/generate",
            json={"prompt": "a red circle", "steps": 2, "seed": 1, "adapters": [{"id": "load-00"}]},
        )
        request_s = time.monotonic() - started
        counters = scrape(http.get("/metrics").text)
    return {
        "drained_s": drained_s,
        "request_status": response.status_code,
        "request_s": request_s,
        "alive": server.alive(),
        "errors_by_type": counters["errors"],
        "images_generated": counters["images"],
        "adapter_loads_by_source": counters["adapter_loads"],
    }


def wait_drained(url: str) -> float | None:
    """Seconds until the queue and the worker are empty; ``None`` if they stay busy past the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        with contextlib.suppress(httpx.HTTPError):
            gauges = scrape(httpx.get(f"{url}/metrics", timeout=10).text)["gauges"]
            if gauges.get("loraswap_queue_depth") == 0 and gauges.get("loraswap_generations_in_flight") == 0:
                return time.monotonic() - started
        time.sleep(0.5)
    return None
