"""Phase ``paths``: the engine's three LoRA paths (none, fused, hooked; issue 13).

* request with one adapter on each path vs the base request (``sample_batch`` with the path forced);
* idle-hook cost: the base request through our manager vs the same with an early-return hook on every
  targetable module (what every request paid before the paths existed);
* fuse + restore of one adapter vs diffusers' ``fuse_lora`` + ``unfuse_lora`` of the same file;
* a Zipf(1.1) stream over 50 adapters, one request at a time, with the policy ``auto`` vs always
  ``hooked`` vs always ``fused`` (throughput, p50, p99);
* a mixed batch of 8 (8 adapters, hooked) vs a uniform batch of 8 (one adapter, fused).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from service.engine.sampler import SampleParams, StageTimer, sample_batch
from service.lora.fusion import FuseSet
from service.lora.model_manager import LoRAModelManager
from service.lora.policy import PathMode
from service.lora.request import AppliedAdapter

from .fixtures import Bench, assert_no_peft_layers, images_diff, phase
from .machine import log
from .report import fmt_s, verdict
from .timing import median, medians, paired, rotated, rounds, stopwatch, timed, timed_result

ZIPF_S = 1.1
STREAM_ADAPTERS = 50
STREAM = {("tiny", False): 40, ("sd15", False): 12}  # requests per policy in the Zipf stream
STREAM_QUICK = 6
FUSE_REPEATS = 10
FUSED_TARGET = 1.02  # fused request ≤1.02× the base request (CPU target)


def bench_paths(bench: Bench) -> None:
    s = bench.sizes
    with phase(bench, "paths") as out:
        cache = bench.unbounded_cache()
        count = min(STREAM_ADAPTERS, len(bench.versions))
        applied = [bench.applied(i, cache.load_blocking(bench.versions[i])) for i in range(count)]
        manager = bench.manager
        out["request"] = per_path_requests(bench, manager, applied[0])
        out["idle_hooks"] = idle_hooks(bench, manager)
        out["fuse_restore"] = fuse_restore(bench, manager, applied[0])
        out["zipf"] = zipf_stream(bench, manager, applied)
        out["batch8"] = mixed_vs_uniform(bench, manager, applied)
        manager.policy.mode = "auto"
        manager.remove()
        cache.close()
        out.update(px=s.request_px, steps=s.request_steps)


def run(bench: Bench, manager: LoRAModelManager, mode: PathMode, batch: list[SampleParams]) -> Any:
    manager.policy.mode = mode
    timer = StageTimer()
    images = sample_batch(bench.pipe, batch, timer, lora=manager)
    return images, timer.lora_path


def timed_run(
    bench: Bench,
    manager: LoRAModelManager,
    mode: PathMode,
    batch: list[SampleParams],
    keep: dict[str, Any],
    label: str,
) -> float:
    (images, path), seconds = timed_result(partial(run, bench, manager, mode, batch), bench.device)
    keep[label] = (images, path)
    return seconds


def per_path_requests(bench: Bench, manager: LoRAModelManager, adapter: AppliedAdapter) -> dict[str, Any]:
    s = bench.sizes
    base = bench.params(s.request_px, s.request_steps, seed=7)
    with_lora = bench.params(s.request_px, s.request_steps, seed=7, adapters=(adapter,))
    keep: dict[str, Any] = {}
    variants: list[tuple[str, Callable[[], float]]] = [
        ("base", partial(timed_run, bench, manager, "auto", [base], keep, "base")),
        ("fused", partial(timed_run, bench, manager, "fused", [with_lora], keep, "fused")),
        ("hooked", partial(timed_run, bench, manager, "hooked", [with_lora], keep, "hooked")),
    ]
    samples = rounds(variants, s.request_repeats, order=rotated, warmup=1)
    log("  paths request: " + ", ".join(f"{k} {fmt_s(median(v))}" for k, v in samples.items()))
    images = {k: v[0][0] for k, v in keep.items()}
    return {
        "median_s": medians(samples),
        "samples_s": samples,
        "paths_taken": {k: v[1] for k, v in keep.items()},
        "ratio_fused_over_base": paired(samples["fused"], samples["base"]),
        "ratio_hooked_over_base": paired(samples["hooked"], samples["base"]),
        "fused_vs_hooked_image_max_diff": images_diff(images["fused"], images["hooked"]),
    }


def idle_hooks(bench: Bench, manager: LoRAModelManager) -> dict[str, Any]:
    """The base request now (no hook runs) vs with an early-return hook on every targetable module."""
    s = bench.sizes
    base = bench.params(s.request_px, s.request_steps, seed=7)
    keep: dict[str, Any] = {}

    def with_idle_hooks() -> float:
        handles = [m.register_forward_hook(lambda *_: None) for m in manager.targets.values()]
        try:
            return timed_run(bench, manager, "auto", [base], keep, "idle_hooks")
        finally:
            for handle in handles:
                handle.remove()

    variants: list[tuple[str, Callable[[], float]]] = [
        ("ours", partial(timed_run, bench, manager, "auto", [base], keep, "ours")),
        ("idle_hooks", with_idle_hooks),
    ]
    samples = rounds(variants, s.request_repeats, order=rotated)
    return {
        "median_s": medians(samples),
        "samples_s": samples,
        "hooked_modules_during_base": manager.hooked_modules,
        "targetable_modules": len(manager.targets),
        "ratio_idle_hooks_over_ours": paired(samples["idle_hooks"], samples["ours"]),
    }


def fuse_restore(bench: Bench, manager: LoRAModelManager, adapter: AppliedAdapter) -> dict[str, Any]:
    fusion = manager.fusion
    assert fusion is not None
    fuse_set = FuseSet.of([(adapter.adapter, 1.0)])
    fuse_s, restore_s, refuse_s = [], [], []
    for _ in range(FUSE_REPEATS):
        fusion.release()  # nothing parked: the fuse computes
        fuse_s.append(timed(partial(fusion.fuse, fuse_set), bench.device))
        restore_s.append(timed(fusion.restore, bench.device))
        refuse_s.append(timed(partial(fusion.fuse, fuse_set), bench.device))  # the parked set
        fusion.restore()
    fusion.release()
    pipe, file = bench.pipe, bench.files[0]
    pipe.load_lora_weights(str(file), adapter_name="fuse")
    diffusers_s = []
    try:
        for _ in range(FUSE_REPEATS):
            _, fuse = stopwatch(partial(pipe.fuse_lora, components=["unet"]))
            _, unfuse = stopwatch(partial(pipe.unfuse_lora, components=["unet"]))
            diffusers_s.append(fuse + unfuse)
    finally:
        pipe.unload_lora_weights()
    assert_no_peft_layers(bench)
    ours = [a + b for a, b in zip(fuse_s, restore_s, strict=True)]
    return {
        "fused_parameters": fusion.parameters(fuse_set),
        "fused_bytes": fusion.nbytes(fuse_set),
        "median_s": {
            "fuse": median(fuse_s),
            "restore": median(restore_s),
            "fuse_parked": median(refuse_s),
            "fuse_plus_restore": median(ours),
            "diffusers_fuse_plus_unfuse": median(diffusers_s),
        },
        "samples_s": {
            "fuse": fuse_s,
            "restore": restore_s,
            "fuse_parked": refuse_s,
            "diffusers": diffusers_s,
        },
        "ratio_diffusers_over_ours": median(diffusers_s) / median(ours),
    }


def zipf_indices(count: int, adapters: int, seed: int = 13) -> list[int]:
    ranks = np.arange(1, adapters + 1, dtype=np.float64)
    weights = ranks**-ZIPF_S
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(adapters, size=count, p=weights / weights.sum())]


def zipf_stream(bench: Bench, manager: LoRAModelManager, applied: list[AppliedAdapter]) -> dict[str, Any]:
    s = bench.sizes
    length = STREAM_QUICK if s.request_repeats <= 2 else STREAM.get((bench.shape, False), STREAM_QUICK)
    order = zipf_indices(length, len(applied))
    results: dict[str, Any] = {}
    for mode in ("auto", "hooked", "fused"):
        manager.remove()  # every policy starts from the loaded weights, nothing parked
        manager.policy = type(manager.policy)(mode)
        latencies, paths = [], []
        for n, index in enumerate(order):
            params = bench.params(s.request_px, s.request_steps, seed=n, adapters=(applied[index],))
            (_, path), seconds = timed_result(partial(run, bench, manager, mode, [params]), bench.device)
            latencies.append(seconds)
            paths.append(path)
        total = sum(latencies)
        results[mode] = {
            "requests": length,
            "throughput_per_s": length / total,
            "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)),
            "paths": {p: paths.count(p) for p in set(paths)},
            "latencies_s": latencies,
        }
        log(f"  zipf {mode}: {length / total:.3f} req/s, p50 {fmt_s(results[mode]['p50_s'])}")
    return {"order": order, "distinct_adapters": len(set(order)), "by_policy": results}


def mixed_vs_uniform(
    bench: Bench, manager: LoRAModelManager, applied: list[AppliedAdapter]
) -> dict[str, Any]:
    s = bench.sizes
    n = min(8, len(applied))
    mixed = [bench.params(s.mixed_px, s.mixed_steps, seed=100 + i, adapters=(applied[i],)) for i in range(n)]
    uniform = [
        bench.params(s.mixed_px, s.mixed_steps, seed=100 + i, adapters=(applied[0],)) for i in range(n)
    ]
    keep: dict[str, Any] = {}
    variants: list[tuple[str, Callable[[], float]]] = [
        ("mixed", partial(timed_run, bench, manager, "auto", mixed, keep, "mixed")),
        ("uniform", partial(timed_run, bench, manager, "auto", uniform, keep, "uniform")),
    ]
    samples = rounds(variants, s.mixed_repeats, order=rotated, warmup=1)
    return {
        "requests": n,
        "median_s": medians(samples),
        "samples_s": samples,
        "paths_taken": {k: v[1] for k, v in keep.items()},
        "ratio_mixed_throughput_over_uniform": paired(samples["uniform"], samples["mixed"]),
    }


def paths_rows(out: dict[str, Any]) -> list[list[str]]:
    req, idle, fr, batch = out["request"], out["idle_hooks"], out["fuse_restore"], out["batch8"]
    med = req["median_s"]
    rows = [
        [
            "request, fused path (1 adapter) vs base",
            fmt_s(med["fused"]),
            fmt_s(med["base"]),
            f"{req['ratio_fused_over_base']:.3f}×",
            f"≤{FUSED_TARGET}×",
            verdict(req["ratio_fused_over_base"] <= FUSED_TARGET),
        ],
        [
            "request, hooked path (1 adapter) vs base",
            fmt_s(med["hooked"]),
            fmt_s(med["base"]),
            f"{req['ratio_hooked_over_base']:.3f}×",
            "(info)",
            "",
        ],
        [
            f"idle hooks: base request vs base with {idle['targetable_modules']} early-return hooks (before)",
            fmt_s(idle["median_s"]["ours"]),
            fmt_s(idle["median_s"]["idle_hooks"]),
            f"{idle['ratio_idle_hooks_over_ours']:.3f}× (before/now)",
            "no hook runs",
            verdict(idle["hooked_modules_during_base"] == 0),
        ],
        [
            f"fuse + restore, 1 adapter ({fr['fused_parameters'] / 1e6:.1f}M params) "
            "vs fuse_lora+unfuse_lora",
            fmt_s(fr["median_s"]["fuse_plus_restore"]),
            fmt_s(fr["median_s"]["diffusers_fuse_plus_unfuse"]),
            f"{fr['ratio_diffusers_over_ours']:.1f}× faster",
            "(info)",
            "",
        ],
        [
            f"  fuse {fmt_s(fr['median_s']['fuse'])}, restore {fmt_s(fr['median_s']['restore'])}, "
            f"re-fuse of the parked set {fmt_s(fr['median_s']['fuse_parked'])}",
            "",
            "",
            "",
            "",
            "",
        ],
    ]
    zipf = out["zipf"]["by_policy"]
    hooked = zipf["hooked"]["throughput_per_s"]
    for mode in ("auto", "fused", "hooked"):
        z = zipf[mode]
        rows.append(
            [
                f"Zipf({ZIPF_S}) stream over {out['zipf']['distinct_adapters']} distinct adapters, {mode}: "
                f"p50 {fmt_s(z['p50_s'])}, p99 {fmt_s(z['p99_s'])}",
                f"{z['throughput_per_s']:.3f} req/s",
                f"{hooked:.3f} req/s",
                f"{z['throughput_per_s'] / hooked:.3f}× hooked",
                "(info)",
                "",
            ]
        )
    rows.append(
        [
            f"mixed batch of {batch['requests']} (hooked) vs uniform batch of {batch['requests']} (fused)",
            fmt_s(batch["median_s"]["mixed"]),
            fmt_s(batch["median_s"]["uniform"]),
            f"{batch['ratio_mixed_throughput_over_uniform']:.2f}× uniform throughput",
            "≥0.9× (GPU target)",
            "n/a on CPU",
        ]
    )
    return rows
