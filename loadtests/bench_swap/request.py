"""Phase 4, per-request latency through ``sample_batch`` (the server's request path): one adapter vs none,
and (where the sizes ask for it) the base request with our hooks removed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from service.engine.sampler import SampleParams, StageTimer, sample_batch

from .fixtures import Bench, images_diff, phase
from .machine import log
from .report import fmt_s
from .timing import Variant, median, medians, paired, rotated_mirrored, rounds, timed_result


@dataclass
class Requests:
    """Runs timed requests and keeps the last images and every stage breakdown per label."""

    bench: Bench
    images: dict[str, list[Any]] = field(default_factory=dict)
    stages: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"base": [], "adapter": [], "base_without_hooks": []}
    )
    paths: dict[str, str] = field(default_factory=dict)  # the LoRA path each label's request took

    def run(self, params: SampleParams, label: str) -> float:
        bench, timer = self.bench, StageTimer()
        # bench.manager is read at call time: run_without_hooks swaps it
        request = partial(sample_batch, bench.pipe, [params], timer, lora=bench.manager)
        images, seconds = timed_result(request, bench.device)
        self.images[label] = images[0]
        self.paths[label] = timer.lora_path
        self.stages.setdefault(label, []).append(timer.seconds)
        return seconds

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
        # variants run back to back in a rotating order, mirrored on odd rounds (as before the split; with
        # two variants that is base, adapter every round); ratios are medians of per-round ratios
        samples = rounds(variants, s.request_repeats, order=rotated_mirrored, after_round=log_round)
        no_hooks = samples.pop("base_without_hooks", [])
        bench.manager.policy.mode = "auto"
        cache.close()
        out.update(request_results(bench, requests, samples, no_hooks))


def log_round(rep: int, samples: dict[str, list[float]]) -> None:
    log(f"  request rep {rep}: " + ", ".join(f"{k} {fmt_s(v[-1])}" for k, v in samples.items()))


def request_results(
    bench: Bench, requests: Requests, samples: dict[str, list[float]], no_hooks: list[float]
) -> dict[str, Any]:
    s, images = bench.sizes, requests.images
    med = medians(samples)
    med["base_without_hooks"] = median(no_hooks)
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
        "ratio_base_over_no_hooks": paired(samples["base"], no_hooks) if no_hooks else None,
        "adapter_changes_image_max_diff": images_diff(images["base"], images["adapter"]),
        "no_hooks_image_equals_base": (
            images_diff(images["base"], images["base_without_hooks"]) == 0 if no_hooks else None
        ),
    }
