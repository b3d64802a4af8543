"""Phase 1, cold load: local disk → ready to run, ours (``AdapterCache``) against diffusers' load + unload.

Engine-level, in this process: ``ours_cache`` is a cold load of a file whose bytes were verified earlier
in this process (a warm server: the cache's stamp check skips the hash, every other check runs);
``ours_first_read`` the same with the cache's record of verified files cleared, so the BLAKE3 (or sha256,
for an older record) of the whole file is computed as well: the load of a file this process never read.
The breakdown repeats the one-pass load step by step (``Registry.open_data`` + ``DeviceAdapter.build``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from adapters.format import Limits, read_adapter
from adapters.metadata import parse_header_metadata
from adapters.records import AdapterVersion
from adapters.validate import check_canonical
from adapters.views import blake3_hex, check_finite_region, file_views, read_file, sha256_hex
from service.lora.cache import AdapterCache
from service.lora.weights import DeviceAdapter

from .fixtures import Bench, assert_no_peft_layers, phase
from .timing import columns, median, medians, paired, repeat, rotated_mirrored, stopwatch, time_repeats, timed

SAMPLE_KEYS = (
    "read_bytes",
    "read_and_parse",
    "ours_cache",
    "ours_first_read",
    "previous_path",
    "diffusers_load",
    "diffusers_unload",
    "diffusers_load_unload",
)
BREAKDOWN_STEPS = (
    "read_file",
    "blake3",
    "sha256_for_reference",
    "header_and_views",
    "check_shapes",
    "check_values",
    "device_build",
)


def bench_cold(bench: Bench) -> None:
    with phase(bench, "cold_load") as out:
        cache = bench.unbounded_cache()
        for version in bench.versions:  # every file read and verified once in this process (a warm
            cache.load_blocking(version)  # server): ``ours_cache`` is then never a first read
            cache.drop(lambda _key: True)
        rows = repeat(partial(cold_round, bench, cache), bench.sizes.cold_repeats, bench.sizes.warmup)
        cache.close()
        assert_no_peft_layers(bench)
        hotswap, hotswap_error = diffusers_hotswap(bench)
        assert_no_peft_layers(bench)
        samples, breakdown = columns(rows, SAMPLE_KEYS), columns(rows, BREAKDOWN_STEPS)
        out.update(cold_results(bench, samples, breakdown, hotswap, hotswap_error))


def cold_round(bench: Bench, cache: AdapterCache, rep: int) -> dict[str, float]:
    """One round over adapter ``rep mod n``: the references, ours (verified before / first read) and
    diffusers, in an order that rotates and runs backwards every other round (so no variant always
    follows the same one: diffusers' load + unload leaves the caches cold for whatever runs next), then
    where our cold load's time goes."""
    device = bench.device
    index = rep % len(bench.versions)
    version, blob, file = bench.versions[index], bench.blob(bench.versions[index]), bench.files[index]
    row: dict[str, float] = {}
    jobs: list[Callable[[], dict[str, float]]] = [
        lambda: {"read_bytes": timed(blob.read_bytes, device)},
        lambda: {"read_and_parse": timed(partial(read_and_parse, blob), device)},
        partial(cold_ours, cache, version, device, first_read=False),
        partial(cold_ours, cache, version, device, first_read=True),
        lambda: {"previous_path": timed(partial(previous_path, bench, version), device)},
        partial(cold_diffusers, bench.pipe, file, device),
    ]
    for job in rotated_mirrored(rep, jobs):
        row.update(job())
    return row | cold_breakdown(bench, version)


def previous_path(bench: Bench, version: AdapterVersion) -> DeviceAdapter:
    """The cold load before the one-pass path (tree 9827773), for an interleaved before/after ratio:
    ``read_bytes``, ``read_adapter`` (header checks + ``safetensors.torch.load``, a copy of every
    tensor), ``check_canonical`` with its per-tensor value sums, then a conversion per tensor in
    ``DeviceAdapter.build``; no hash (a file verified before, as ``ours_cache``)."""
    registry = bench.registry
    data = bench.blob(version).read_bytes()
    limits = Limits(max_bytes=len(data), max_header_bytes=registry.limits.max_header_bytes)
    tensors, header = read_adapter(data, limits=limits)
    check_canonical(tensors, registry.base.architecture if registry.base else None)
    parse_header_metadata(header)
    non_blocking = bench.device.type == "cuda"
    targets = bench.manager.targets
    return DeviceAdapter.build("x", tensors, targets, bench.device, bench.dtype, non_blocking=non_blocking)


def read_and_parse(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(path.read_bytes())


def cold_ours(
    cache: AdapterCache, version: AdapterVersion, device: torch.device, *, first_read: bool
) -> dict[str, float]:
    """Store → ready-to-run through the cache, with the device and host tiers empty; ``first_read``:
    as if this process had never read the file (its hash is computed and its header parsed too)."""
    cache.drop(lambda _key: True)
    if first_read:  # this file only: the other variants' files stay verified (a warm server)
        cache.forget_reads(version)
    seconds = timed(partial(cache.load_blocking, version), device)
    cache.drop(lambda _key: True)
    return {"ours_first_read" if first_read else "ours_cache": seconds}


def cold_diffusers(pipe: Any, file: Path, device: torch.device) -> dict[str, float]:
    load = timed(partial(pipe.load_lora_weights, str(file), adapter_name="cold"), device)
    unload = timed(pipe.unload_lora_weights, device)
    return {"diffusers_load": load, "diffusers_unload": unload, "diffusers_load_unload": load + unload}


def cold_breakdown(bench: Bench, version: AdapterVersion) -> dict[str, float]:
    """Where our cold load's time goes: the steps ``Registry.open_data`` and the cache take, one by one
    (plus the sha256 it no longer computes per load, for reference)."""
    registry = bench.registry
    architecture = registry.base.architecture if registry.base else None
    blob = bench.blob(version)
    step: dict[str, float] = {}
    stamped, step["read_file"] = stopwatch(partial(read_file, blob, pin=bench.device.type == "cuda"))
    assert stamped is not None
    buffer = stamped[0]
    digest, step["blake3"] = stopwatch(partial(blake3_hex, buffer))
    assert version.blake3 in (None, digest)
    sha, step["sha256_for_reference"] = stopwatch(partial(sha256_hex, buffer))
    assert sha == version.sha256
    limits = Limits(max_bytes=buffer.numel(), max_header_bytes=registry.limits.max_header_bytes)
    (files, _), step["header_and_views"] = stopwatch(partial(file_views, buffer, limits))
    _, step["check_shapes"] = stopwatch(partial(check_canonical, files.tensors, architecture, finite=False))
    _, step["check_values"] = stopwatch(partial(check_finite_region, files))
    non_blocking = bench.device.type == "cuda"

    def build() -> DeviceAdapter:
        """As the cache builds: on a CPU the LoRA pairs stay views of the buffer (``compact``), on CUDA
        the region is converted and uploaded."""
        compact = bench.device.type == "cpu"
        device, dtype = bench.device, bench.dtype
        tensors = files.tensors if compact else files.materialise(device, dtype, non_blocking=True)
        targets = bench.manager.targets
        return DeviceAdapter.build(
            "x", tensors, targets, bench.device, bench.dtype, non_blocking=non_blocking, compact=compact
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
        "ratio_load_unload_over_first_read": paired(
            samples["diffusers_load_unload"], samples["ours_first_read"]
        ),
        "ratio_first_read_over_read_bytes": paired(samples["ours_first_read"], samples["read_bytes"]),
        "ratio_previous_over_ours": paired(samples["previous_path"], samples["ours_cache"]),
        "ratio_hotswap_over_ours": med["diffusers_hotswap"] / med["ours_cache"],
        "note": "files in the page cache (warm reads); diffusers' low_cpu_mem_usage left at its default; "
        "ours_cache: the file's bytes verified earlier in this process (a warm server), ours_first_read: "
        "its hash computed too",
    }
