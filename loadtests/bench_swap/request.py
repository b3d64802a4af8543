"""Phase 4, per-request latency through ``sample_batch`` (the server's request path): one adapter vs none,
and (where the sizes ask for it) the base request with our hooks removed.

Every request is timed by the wall clock and by the process's CPU time. On the shared 2-core machine the
wall time of a 15-40 s request swings by ±50 % with the other processes (the same request's prompt
encoding and VAE decoding, which no LoRA touches, did), and two rounds of that once read as a fused
Flux request 0.64× its base request; the CPU-time ratio is the one those swings do not reach."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from service.engine.sampler import SampleParams, StageTimer, sample_batch

from .fixtures import Bench, images_diff, phase
from .machine import log
from .report import fmt_s
from .timing import Variant, clocked_result, median, medians, paired, rotated_mirrored, rounds


@dataclass
class Requests:
    """Runs timed requests and keeps the last images and every stage breakdown per label."""

    bench: Bench
    images: dict[str, list[Any]] = field(default_factory=dict)
    stages: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"base": [], "adapter": [], "base_without_hooks": []}
    )
    paths: dict[str, str] = field(default_factory=dict)  # the LoRA path each label's request took
    cpu_s: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds per request
    queued_s: dict[str, list[float]] = field(default_factory=dict)  # seconds waiting for a core

    def run(self, params: SampleParams, label: str) -> float:
        bench, timer = self.bench, StageTimer()
        # bench.manager is read at call time: run_without_hooks swaps it
        request = partial(sample_batch, bench.pipe, [params], timer, lora=bench.manager)
        images, clocks = clocked_result(request, bench.device)
        self.cpu_s.setdefault(label, []).append(clocks.cpu)
        self.queued_s.setdefault(label, []).append(clocks.queued)
        self.images[label] = images[0]
        self.paths[label] = timer.lora_path
        self.stages.setdefault(label, []).append(timer.seconds)
        return clocks.wall

    def run_without_hooks(self, params: SampleParams, label: str) -> float:
        """The request with our hooks removed (what idle hooks cost), then the hooks put back."""
        self.bench.manager.remove()
        try:
            return self.run(params, label)
        finally:
            self.bench.reinstall_hooks()


def bench_request(bench: Bench) -> None:
    s = bench.sizes
    with phase(bench, "request") as out:
        cache = bench.unbounded_cache()
        adapter = cache.load_blocking(bench.versions[0])
        bench.manager.policy.mode = s.request_path  # type: ignore[assignment]
        base = bench.params(s.request_px, s.request_steps, seed=7)
        with_lora = replace(base, adapters=(bench.applied(0, adapter),))
        requests = Requests(bench)
        requests.run(replace(base, steps=1), "warm-up")
        requests.run(replace(with_lora, steps=1), "warm-up")
        variants: list[Variant[str]] = [
            ("base", partial(requests.run, base, "base")),
            ("adapter", partial(requests.run, with_lora, "adapter")),
        ]
        if s.no_hooks:
            variants.append(
                ("base_without_hooks", partial(requests.run_without_hooks, base, "base_without_hooks"))
            )
        # variants run back to back in a rotating order, mirrored on odd rounds (with two variants:
        # base, adapter; adapter, base; …); ratios are medians of per-round ratios
        samples = rounds(
            variants, s.request_repeats, order=rotated_mirrored, after_round=partial(log_round, requests)
        )
        no_hooks = samples.pop("base_without_hooks", [])
        bench.manager.policy.mode = "auto"
        cache.close()
        out.update(request_results(bench, requests, samples, no_hooks))


def log_round(requests: Requests, rep: int, samples: dict[str, list[float]]) -> None:
    def clocks(label: str) -> str:
        cpu, queued = requests.cpu_s[label][-1], requests.queued_s[label][-1]
        return f"{fmt_s(samples[label][-1])} (CPU {fmt_s(cpu)}, queued {fmt_s(queued)})"

    log(f"  request rep {rep}: " + ", ".join(f"{label} {clocks(label)}" for label in samples))


def request_results(
    bench: Bench, requests: Requests, samples: dict[str, list[float]], no_hooks: list[float]
) -> dict[str, Any]:
    s, images = bench.sizes, requests.images
    med = medians(samples)
    med["base_without_hooks"] = median(no_hooks)
    cpu = {k: v for k, v in requests.cpu_s.items() if k != "warm-up"}
    queued = {k: v for k, v in requests.queued_s.items() if k != "warm-up"}
    return {
        "px": s.request_px,
        "steps": s.request_steps,
        "guidance_scale": bench.guidance,
        "scheduler": bench.scheduler,
        "path_policy": s.request_path,
        "paths_taken": {k: v for k, v in requests.paths.items() if k != "warm-up"},
        "median_s": med,
        "samples_s": samples | {"base_without_hooks": no_hooks},
        "stage_s": {k: v for k, v in requests.stages.items() if k != "warm-up"},
        "ratio_adapter_over_base": paired(samples["adapter"], samples["base"]),
        "cpu_s": cpu,
        "median_cpu_s": medians(cpu),
        "queued_s": queued,
        "ratio_adapter_over_base_cpu": paired(cpu["adapter"], cpu["base"]),
        "ratio_base_over_no_hooks": paired(samples["base"], no_hooks) if no_hooks else None,
        "adapter_changes_image_max_diff": images_diff(images["base"], images["adapter"]),
        "no_hooks_image_equals_base": (
            images_diff(images["base"], images["base_without_hooks"]) == 0 if no_hooks else None
        ),
    }
