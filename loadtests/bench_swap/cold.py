"""Phase 1, cold load: local disk → ready to run, ours (``AdapterCache``) against diffusers' load + unload."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from adapters.format import Limits, read_adapter
from adapters.records import AdapterVersion
from adapters.validate import check_canonical
from service.lora.cache import AdapterCache
from service.lora.weights import DeviceAdapter

from .fixtures import Bench, assert_no_peft_layers, phase
from .timing import columns, median, medians, paired, repeat, rotated, stopwatch, time_repeats, timed

SAMPLE_KEYS = (
    "read_bytes",
    "read_and_parse",
    "ours_cache",
    "ours_lite",
    "diffusers_load",
    "diffusers_unload",
    "diffusers_load_unload",
)
BREAKDOWN_STEPS = ("store_read", "sha256", "header_check_and_parse", "check_canonical", "device_build")


def bench_cold(bench: Bench) -> None:
    with phase(bench, "cold_load") as out:
        cache = bench.unbounded_cache()
        rows = repeat(partial(cold_round, bench, cache), bench.sizes.cold_repeats, bench.sizes.warmup)
        cache.close()
        assert_no_peft_layers(bench)
        hotswap, hotswap_error = diffusers_hotswap(bench)
        assert_no_peft_layers(bench)
        samples, breakdown = columns(rows, SAMPLE_KEYS), columns(rows, BREAKDOWN_STEPS)
        out.update(cold_results(bench, samples, breakdown, hotswap, hotswap_error))


def cold_round(bench: Bench, cache: AdapterCache, rep: int) -> dict[str, float]:
    """One round over adapter ``rep mod n``: the references, ours and diffusers (alternating which goes
    first), ours lite, and where our cold load's time goes."""
    device = bench.device
    index = rep % len(bench.versions)
    version, blob, file = bench.versions[index], bench.blob(bench.versions[index]), bench.files[index]
    row: dict[str, float] = {}
    row["read_bytes"] = timed(blob.read_bytes, device)
    row["read_and_parse"] = timed(partial(read_and_parse, blob), device)
    jobs = [partial(cold_ours, cache, version, device), partial(cold_diffusers, bench.pipe, file, device)]
    for job in rotated(rep, jobs):
        row.update(job())
    row["ours_lite"] = timed(partial(load_lite, blob, bench.manager.targets, device, bench.dtype), device)
    return row | cold_breakdown(bench, version)


def read_and_parse(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(path.read_bytes())


def cold_ours(cache: AdapterCache, version: AdapterVersion, device: torch.device) -> dict[str, float]:
    """Store → ready-to-run through the cache, with the device and host tiers empty."""
    cache.drop(lambda _key: True)
    seconds = timed(partial(cache.load_blocking, version), device)
    cache.drop(lambda _key: True)
    return {"ours_cache": seconds}


def load_lite(
    path: Path, targets: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype
) -> None:
    """Read + header-checked parse (``read_adapter``) + ``DeviceAdapter.build``; no sha256/value checks."""
    tensors, _ = read_adapter(path.read_bytes())
    DeviceAdapter.build("lite", tensors, targets, device, dtype, non_blocking=device.type == "cuda")


def cold_diffusers(pipe: Any, file: Path, device: torch.device) -> dict[str, float]:
    load = timed(partial(pipe.load_lora_weights, str(file), adapter_name="cold"), device)
    unload = timed(pipe.unload_lora_weights, device)
    return {"diffusers_load": load, "diffusers_unload": unload, "diffusers_load_unload": load + unload}


def cold_breakdown(bench: Bench, version: AdapterVersion) -> dict[str, float]:
    """Where our cold load's time goes: the same calls ``AdapterCache._load`` makes, one by one."""
    max_header_bytes = bench.registry.limits.max_header_bytes
    architecture = bench.registry.base.architecture if bench.registry.base else None
    step: dict[str, float] = {}
    data, step["store_read"] = stopwatch(partial(bench.registry.read_blob, version))
    digest, step["sha256"] = stopwatch(lambda: hashlib.sha256(data).hexdigest())
    assert digest == version.sha256
    parse = partial(read_adapter, data, limits=Limits(max_bytes=len(data), max_header_bytes=max_header_bytes))
    (tensors, _), step["header_check_and_parse"] = stopwatch(parse)
    _, step["check_canonical"] = stopwatch(partial(check_canonical, tensors, architecture))
    build = partial(
        DeviceAdapter.build,
        "x",
        tensors,
        bench.manager.targets,
        bench.device,
        bench.dtype,
        non_blocking=bench.device.type == "cuda",
    )
    step["device_build"] = timed(build, bench.device)
    return step


def diffusers_hotswap(bench: Bench) -> tuple[list[float], str | None]:
    """diffusers' own hot-swap: replace the weights of an already loaded adapter in place."""
    pipe, files = bench.pipe, bench.files

    def hotswap(rep: int) -> None:
        pipe.load_lora_weights(str(files[(rep + 1) % len(files)]), adapter_name="slot", hotswap=True)

    samples: list[float] = []
    error = None
    try:
        pipe.load_lora_weights(str(files[0]), adapter_name="slot")
        samples = time_repeats(hotswap, bench.device, bench.sizes.hotswap_repeats, bench.sizes.warmup)
    except Exception as exc:  # an API difference must not sink the whole run
        error = f"{type(exc).__name__}: {exc}"
    finally:
        pipe.unload_lora_weights()
    return samples, error


def cold_results(
    bench: Bench,
    samples: dict[str, list[float]],
    breakdown: dict[str, list[float]],
    hotswap: list[float],
    hotswap_error: str | None,
) -> dict[str, Any]:
    med = medians(samples)
    med["diffusers_hotswap"] = median(hotswap)
    return {
        "file_bytes": bench.blob(bench.versions[0]).stat().st_size,
        "peft_file_bytes": bench.files[0].stat().st_size,
        "median_s": med,
        "breakdown_median_s": medians(breakdown),
        "samples_s": samples | {"diffusers_hotswap": hotswap},
        "hotswap_error": hotswap_error,
        "ratio_load_unload_over_ours": paired(samples["diffusers_load_unload"], samples["ours_cache"]),
        "ratio_ours_over_read_bytes": paired(samples["ours_cache"], samples["read_bytes"]),
        "ratio_ours_over_read_and_parse": paired(samples["ours_cache"], samples["read_and_parse"]),
        "ratio_load_unload_over_lite": paired(samples["diffusers_load_unload"], samples["ours_lite"]),
        "ratio_lite_over_read_bytes": paired(samples["ours_lite"], samples["read_bytes"]),
        "ratio_hotswap_over_ours": med["diffusers_hotswap"] / med["ours_cache"],
        "note": "files in the page cache (warm reads); diffusers' low_cpu_mem_usage left at its default",
    }
