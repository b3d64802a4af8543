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
from service.lora.cache import AdapterCache, key_of
from service.lora.model_manager import ActiveLoRA, LoRAModelManager
from service.lora.weights import DeviceAdapter

from .fixtures import Bench, assert_no_peft_layers, phase
from .machine import log, peak_rss_bytes, release_memory
from .report import fmt_s
from .timing import Variant, flatness, median, paired, rotated, rounds, time_repeats, timed

Samples = dict[int, list[float]]  # per resident count
MEASURES = ("activate", "acquire", "activate_one", "acquire_one")

NOTE = (
    "ours_activate = entering + leaving manager.activate([ActiveLoRA(adapter, 1.0)]) for the "
    "next resident adapter (the per-request cost in the worker; with 1 resident the same adapter "
    "again, which costs what a switch between adapters on the same modules does); the acquire path "
    "adds AdapterCache.acquire (device hit) + release, run in an asyncio loop. One cache, grown "
    "to each resident count (1 → max) and dropped back (max → 1), half the samples each way. Each "
    "round also times the same loops on the first adapter alone (the *_one samples, same cache, "
    "same moment): the paired flatness is the spread of the per-round ratios to that reference"
)


def bench_switch(bench: Bench) -> None:
    counts = [c for c in bench.sizes.resident if c <= len(bench.versions)]
    with phase(bench, "switch") as out:
        theirs, load_times = diffusers_switches(bench, counts)
        unload_all = timed(bench.pipe.unload_lora_weights, bench.device)
        assert_no_peft_layers(bench)
        release_memory()  # diffusers' adapters go before ours are built: the peak holds one engine's
        out["peak_rss_diffusers_bytes"] = peak_rss_bytes()
        ours = our_switches(bench, counts)
        activate, acquire = ours["activate"], ours["acquire"]
        for count in counts:
            log(
                f"  ours with {count} resident: activate {fmt_s(median(activate[count]))}, "
                f"acquire+activate+release {fmt_s(median(acquire[count]))}"
            )
        out.update(switch_results(counts, theirs, ours))
        out.update(
            diffusers_load_s_by_resident_before=load_times,
            diffusers_unload_all_s=unload_all,
            samples_s={
                "diffusers_set_adapters": {str(k): v for k, v in theirs.items()},
                "ours_activate": {str(k): v for k, v in activate.items()},
                "ours_acquire_activate_release": {str(k): v for k, v in acquire.items()},
                **{
                    f"ours_{measure}_one": {str(k): v for k, v in ours[f"{measure}_one"].items()}
                    for measure in ("activate", "acquire")
                },
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


def our_switches(bench: Bench, counts: Sequence[int]) -> dict[str, Samples]:
    """One cache, grown to each resident count in turn and dropped back: at every count it holds exactly
    that many device-resident adapters, and no more than the largest count's are ever in memory (one
    cache per count held 1 + 4 + 16 + 64: 85 adapters, 7.8 GiB on SD3.5 medium in fp32). Half of a
    count's samples are taken on the way up (1 → 64) and the rest on the way down (64 → 1), so a load
    drift on a shared machine reaches every count alike.

    Returns seconds per switch by measure: ``activate`` alone, ``acquire`` (acquire + activate +
    release), and both on the first adapter alone in the same rounds (``activate_one``, ``acquire_one``:
    the reference a count's samples are paired with)."""
    s = bench.sizes
    cache = bench.device_only_cache()
    pool: list[DeviceAdapter] = []
    samples_by: dict[str, Samples] = {m: {count: [] for count in counts} for m in MEASURES}
    up = (s.switch_samples + 1) // 2
    try:
        for count, samples in [(c, up) for c in counts] + [(c, s.switch_samples - up) for c in counts[::-1]]:
            pool += [cache.load_blocking(v) for v in bench.versions[len(pool) : count]]
            del pool[count:]
            surplus = set(cache.resident()) - {key_of(v) for v in bench.versions[:count]}
            cache.drop(surplus.__contains__)
            assert len(cache.resident()) == count
            measured = sample_count(bench, cache, pool, samples)
            for measure in MEASURES:
                samples_by[measure][count] += measured[measure]
    finally:
        cache.close()
    return samples_by


def sample_count(
    bench: Bench, cache: AdapterCache, pool: Sequence[DeviceAdapter], samples: int
) -> dict[str, list[float]]:
    """``samples`` rounds of every measure (``MEASURES``) with ``pool`` (the cache's resident adapters)
    and with its first adapter alone, after a warm-up; the order rotates from round to round."""
    s, manager = bench.sizes, bench.manager
    variants: list[Variant[str]] = []
    for suffix, adapters in (("", pool), ("_one", pool[:1])):
        versions = bench.versions[: len(adapters)]
        switch = partial(activate_loop, manager, adapters, s.switch_loops)
        path = partial(acquire_loop, cache, manager, versions, s.acquire_loops)
        switch()  # warm-up
        asyncio.run(path())
        variants.append((f"activate{suffix}", partial(per_loop, switch, bench.device, s.switch_loops)))
        variants.append((f"acquire{suffix}", partial(run_acquire_path, path)))
    return rounds(variants, samples, order=rotated)


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


def switch_results(counts: Sequence[int], theirs: Samples, ours: dict[str, Samples]) -> dict[str, Any]:
    """The per-count table rows and how flat each side stays as the resident count grows."""
    activate, acquire = ours["activate"], ours["acquire"]
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
                # per-round ratios to the first adapter alone, timed beside them (1.0 at 1 resident)
                "ours_activate_over_one": paired(activate[count], ours["activate_one"][count]),
                "ours_acquire_path_over_one": paired(acquire[count], ours["acquire_one"][count]),
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
        "ours_activate_flatness_paired": flatness([r["ours_activate_over_one"] for r in rows]),
        "ours_acquire_path_flatness_paired": flatness([r["ours_acquire_path_over_one"] for r in rows]),
        "diffusers_growth_last_over_first": their[-1] / their[0],
    }
