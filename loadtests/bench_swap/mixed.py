"""Phase 5, mixed batch: N requests with N different adapters in one ``sample_batch`` vs N sequential ones."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from service.engine.sampler import SampleParams, StageTimer, sample_batch
from service.lora.request import AppliedAdapter

from .fixtures import Bench, images_diff, phase
from .machine import log
from .report import fmt_s
from .timing import Variant, medians, paired, rotated, rounds, timed_result

Batch = list[SampleParams]
Images = list[list[Any]]  # per request, its images


def bench_mixed(bench: Bench) -> None:
    s = bench.sizes
    count = min(s.mixed_requests, len(bench.versions))
    with phase(bench, "mixed") as out:
        cache = bench.unbounded_cache()
        applied = tuple(bench.applied(i, cache.load_blocking(bench.versions[i])) for i in range(count))
        warm = requests(bench, applied, steps=1)
        mixed(bench, warm)
        sequential(bench, warm[:1])
        batch = requests(bench, applied, steps=s.mixed_steps)
        outputs: dict[str, Images] = {}
        variants: list[Variant[str]] = [
            ("mixed", partial(timed_run, bench, mixed, batch, outputs, "mixed")),
            ("sequential", partial(timed_run, bench, sequential, batch, outputs, "sequential")),
        ]
        samples = rounds(variants, s.mixed_repeats, order=rotated, after_round=log_round)
        cache.close()
        med = medians(samples)
        rows_diff = images_diff(
            [img for imgs in outputs["mixed"] for img in imgs],
            [img for imgs in outputs["sequential"] for img in imgs],
        )
        out.update(
            requests=count,
            px=s.mixed_px,
            steps=s.mixed_steps,
            median_s=med,
            samples_s=samples,
            images_per_s={k: count / v for k, v in med.items()},
            ratio_sequential_over_mixed=paired(samples["sequential"], samples["mixed"]),
            mixed_vs_sequential_image_max_diff=rows_diff,
        )


def requests(bench: Bench, applied: tuple[AppliedAdapter, ...], steps: int) -> Batch:
    """One request per adapter, each with its own seed."""
    px = bench.sizes.mixed_px
    return [bench.params(px, steps, seed=100 + i, adapters=(adapter,)) for i, adapter in enumerate(applied)]


def mixed(bench: Bench, batch: Batch) -> Images:
    return sample_batch(bench.pipe, batch, StageTimer(), lora=bench.manager)


def sequential(bench: Bench, batch: Batch) -> Images:
    return [sample_batch(bench.pipe, [p], StageTimer(), lora=bench.manager)[0] for p in batch]


def timed_run(
    bench: Bench,
    fn: Callable[[Bench, Batch], Images],
    batch: Batch,
    outputs: dict[str, Images],
    label: str,
) -> float:
    """Seconds for ``fn(bench, batch)``; its images kept in ``outputs[label]``."""
    outputs[label], seconds = timed_result(partial(fn, bench, batch), bench.device)
    return seconds


def log_round(rep: int, samples: dict[str, list[float]]) -> None:
    mixed, sequential = samples["mixed"][-1], samples["sequential"][-1]
    log(f"  mixed rep {rep}: mixed {fmt_s(mixed)}, sequential {fmt_s(sequential)}")
