"""Phases 2./3., warm switch against the resident count: our ``activate`` (and the cache's request path)
against diffusers' ``set_adapters`` with that many adapters loaded."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from adapters.records import AdapterVersion
from service.lora.cache import AdapterCache
from service.lora.model_manager import ActiveLoRA, LoRAModelManager
from service.lora.weights import DeviceAdapter

from .fixtures import Bench, assert_no_peft_layers, phase
from .machine import log
from .report import fmt_s
from .timing import Variant, fixed, flatness, median, rounds, time_repeats, timed

Samples = dict[int, list[float]]  # per resident count

NOTE = (
    "ours_activate = entering + leaving manager.activate([ActiveLoRA(adapter, 1.0)]) for the "
    "next resident adapter (the per-request cost in the worker); the acquire path adds "
    "AdapterCache.acquire (device hit) + release, run in an asyncio loop"
)


def bench_switch(bench: Bench) -> None:
    counts = [c for c in bench.sizes.resident if c <= len(bench.versions)]
    with phase(bench, "switch") as out:
        theirs, load_times = diffusers_switches(bench, counts)
        unload_all = timed(bench.pipe.unload_lora_weights, bench.device)
        assert_no_peft_layers(bench)
        activate, acquire = our_switches(bench, counts)
        for count in counts:
            log(
                f"  ours with {count} resident: activate {fmt_s(median(activate[count]))}, "
                f"acquire+activate+release {fmt_s(median(acquire[count]))}"
            )
        out.update(switch_results(counts, theirs, activate, acquire))
        out.update(
            diffusers_load_s_by_resident_before=load_times,
            diffusers_unload_all_s=unload_all,
            samples_s={
                "diffusers_set_adapters": {str(k): v for k, v in theirs.items()},
                "ours_activate": {str(k): v for k, v in activate.items()},
                "ours_acquire_activate_release": {str(k): v for k, v in acquire.items()},
            },
            note=NOTE,
        )


# -- diffusers ---------------------------------------------------------------------------------------


def diffusers_switches(bench: Bench, counts: Sequence[int]) -> tuple[Samples, list[float]]:
    """Load adapters one by one; at each resident count, time ``set_adapters`` switches among them.

    Returns the switch samples per count and the load time of every adapter."""
    pipe, device = bench.pipe, bench.device
    theirs: Samples = {}
    load_times: list[float] = []
    for count in counts:
        while len(load_times) < count:
            loaded = len(load_times)
            load = partial(pipe.load_lora_weights, str(bench.files[loaded]), adapter_name=f"a{loaded}")
            load_times.append(timed(load, device))
        names = [f"a{j}" for j in range(count)]
        # call 0 (adapter a0) is the warm-up; call i switches to a(i mod count)
        switch = partial(set_adapter, pipe, names)
        theirs[count] = time_repeats(switch, device, bench.sizes.set_adapters_calls, warmup=1)
        log(f"  diffusers set_adapters with {count} loaded: {fmt_s(median(theirs[count]))}")
    return theirs, load_times


def set_adapter(pipe: Any, names: Sequence[str], call: int) -> None:
    pipe.set_adapters([names[call % len(names)]], [1.0])


# -- ours --------------------------------------------------------------------------------------------


def our_switches(bench: Bench, counts: Sequence[int]) -> tuple[Samples, Samples]:
    """One cache per resident count, holding exactly ``count`` device-resident adapters; the counts are
    sampled round-robin so load swings on a shared machine hit every count alike.

    Returns seconds per switch: ``activate`` alone, and acquire + activate + release."""
    s = bench.sizes
    caches = []
    variants: list[Variant[tuple[str, int]]] = []
    for count in counts:
        cache = bench.device_only_cache()
        caches.append(cache)
        versions = bench.versions[:count]
        pool = [cache.load_blocking(v) for v in versions]
        switch = partial(activate_loop, bench.manager, pool, s.switch_loops)
        path = partial(acquire_loop, cache, bench.manager, versions, s.acquire_loops)
        switch()  # warm-up
        asyncio.run(path())
        variants.append((("activate", count), partial(per_loop, switch, bench.device, s.switch_loops)))
        variants.append((("acquire", count), partial(run_acquire_path, path)))
    samples = rounds(variants, s.switch_samples, order=fixed)
    for cache in caches:
        cache.close()
    activate = {count: samples["activate", count] for count in counts}
    acquire = {count: samples["acquire", count] for count in counts}
    return activate, acquire


def activate_loop(manager: LoRAModelManager, pool: Sequence[DeviceAdapter], loops: int) -> None:
    """Enter and leave ``activate`` for the next resident adapter, ``loops`` times."""
    for k in range(loops):
        with manager.activate([ActiveLoRA(pool[k % len(pool)], 1.0)]):
            pass


async def acquire_loop(
    cache: AdapterCache, manager: LoRAModelManager, versions: Sequence[AdapterVersion], loops: int
) -> float:
    """Seconds per acquire (device hit) + activate + release, the worker's per-request path."""
    started = time.perf_counter()
    for k in range(loops):
        version = versions[k % len(versions)]
        adapter = await cache.acquire(version)
        try:
            with manager.activate([ActiveLoRA(adapter, 1.0)]):
                pass
        finally:
            cache.release(version)
    return (time.perf_counter() - started) / loops


def per_loop(loop: Callable[[], None], device: torch.device, loops: int) -> float:
    return timed(loop, device) / loops


def run_acquire_path(path: Callable[[], Any]) -> float:
    gc.collect()
    return float(asyncio.run(path()))


# -- results -----------------------------------------------------------------------------------------


def switch_results(
    counts: Sequence[int], theirs: Samples, activate: Samples, acquire: Samples
) -> dict[str, Any]:
    """The per-count table rows and how flat each side stays as the resident count grows."""
    rows = []
    for count in counts:
        t, a, q = median(theirs[count]), median(activate[count]), median(acquire[count])
        rows.append(
            {
                "resident": count,
                "diffusers_set_adapters_s": t,
                "ours_activate_s": a,
                "ours_acquire_activate_release_s": q,
                "ratio_set_adapters_over_activate": t / a,
                "ratio_set_adapters_over_acquire_path": t / q,
                "ours_activate_min_s": min(activate[count]),
                "ours_acquire_activate_release_min_s": min(acquire[count]),
            }
        )
    their = [r["diffusers_set_adapters_s"] for r in rows]
    return {
        "rows": rows,
        "ours_activate_flatness": flatness([r["ours_activate_s"] for r in rows]),
        "ours_acquire_path_flatness": flatness([r["ours_acquire_activate_release_s"] for r in rows]),
        "ours_activate_flatness_of_minima": flatness([r["ours_activate_min_s"] for r in rows]),
        "ours_acquire_path_flatness_of_minima": flatness(
            [r["ours_acquire_activate_release_min_s"] for r in rows]
        ),
        "diffusers_growth_last_over_first": their[-1] / their[0],
    }
