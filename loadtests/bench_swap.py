"""Hot-swap benchmark (issue 4): our LoRA engine against plain diffusers, same model, same files, one run.

Not a test. It prints a table and writes everything it measured (raw samples included) to
``loadtests/results/bench_swap-<shape>-<device>[-quick].json``::

    python -m loadtests.bench_swap --shape tiny|sd15 [--device cpu|cuda] [--adapters N] [--quick]

Shapes:

* ``tiny``: the embedded tiny-sd (``basemodel.tiny.build_tiny_pipeline()``), rank-4 attention LoRAs.
* ``sd15``: SD1.5-shaped, random-init pipeline built from the shipped configs in
  ``basemodel/configs/sd15`` (UNet ~860M parameters, the full CLIP ViT-L text encoder, the SD VAE; no
  weights downloaded), rank-16 attention LoRAs.

Adapters: peft lays them out (``inject_adapter_in_model(LoraConfig(r, lora_alpha=r, target_modules=
[to_q, to_k, to_v, to_out.0], init_lora_weights=False))`` on a meta-device copy of the UNet, then
``get_peft_model_state_dict``); each adapter's values are drawn, seeded, from the distribution that
``init_lora_weights=False`` leaves (``nn.Linear``'s default init, so B is nonzero). Keys are prefixed
``unet.`` and saved with safetensors (fp16 by default) — the diffusers/PEFT layout with alpha = rank. The
same files are registered in a local store for our engine and loaded from disk by diffusers.

What is measured (after a warm-up; times are medians of repeats; where ours and a baseline are compared
they run back to back in alternating order, and the ratio is the median of the per-round ratios, so a
load swing on a shared machine hits both sides of a ratio alike):

1. cold load, local disk → ready to run. Ours = ``AdapterCache.load_blocking`` with the device and host
   tiers empty (store read + sha256 + header check + parse + ``check_canonical`` + ``DeviceAdapter.build``),
   with a per-step breakdown. Baseline = ``pipe.load_lora_weights(file)`` + ``pipe.unload_lora_weights()``;
   ``hotswap=True`` into a loaded slot is reported as well. References: ``Path.read_bytes`` and
   ``read_bytes`` + ``safetensors.torch.load``. The files are in the page cache (warm reads).
2./3. warm switch with 1…64 adapters resident. Ours = entering and leaving
   ``LoRAModelManager.activate([ActiveLoRA(adapter, 1.0)])`` for another resident adapter, and the full
   request-path version ``await cache.acquire`` + activate + ``cache.release``. Baseline =
   ``pipe.set_adapters([name], [1.0])`` with that many adapters loaded.
   unet_step: one CFG-shaped UNet forward with the adapter through our hooks and through diffusers' peft
   layers (same file; outputs compared) vs the base forward.
4. per-request latency through ``sample_batch`` (the server's request path), with one adapter vs none,
   and (tiny) vs the base request with our hooks removed.
5. 8 requests with 8 different adapters: one mixed ``sample_batch`` vs 8 sequential calls.
6. process RSS (and CUDA memory) before/after many swaps over 50 adapters with a device tier of 8.

On CPU the run uses one torch thread unless ``--threads`` says otherwise (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from adapters.format import Limits, read_adapter
from adapters.identity import BaseIdentity
from adapters.records import AdapterVersion, blob_key
from adapters.registry import Registry
from adapters.sources import LocalStore
from adapters.validate import check_canonical
from basemodel.fingerprint import architecture_of
from basemodel.loader import family_of
from service.engine.sampler import SampleParams, StageTimer, sample_batch
from service.lora.cache import AdapterCache, Budgets
from service.lora.model_manager import ActiveLoRA, LoRAModelManager
from service.lora.request import AppliedAdapter
from service.lora.weights import DeviceAdapter
from service.metrics import Metrics

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a red circle on a blue background"
SCHEDULER = "ddim"
GUIDANCE = 7.5
MIB = 1 << 20

TARGETS = {
    "cold_vs_load_unload": 20.0,  # ours ≥20× faster than load_lora_weights + unload_lora_weights
    "cold_vs_read": 3.0,  # ours ≤3× the time to read the file
    "switch_vs_set_adapters": 50.0,  # ours ≥50× faster than set_adapters
    "switch_flat": 1.5,  # ours: slowest / fastest over the resident counts ≤1.5 ("flat")
    "request_overhead": 1.10,  # adapter request ≤1.10× the base request
    "mixed_speedup": 1.5,  # mixed batch ≥1.5× sequential (a CUDA target)
    "memory_growth_pct": 2.0,  # RSS growth over the swaps ≤2 %
}


# -- sizes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    rank: int
    adapters: int  # adapter files generated (and registered)
    resident: tuple[int, ...]  # resident counts for the switch table
    cold_repeats: int
    hotswap_repeats: int
    set_adapters_calls: int  # diffusers set_adapters calls per resident count
    switch_loops: int  # our activate/leave pairs per timing sample
    switch_samples: int
    acquire_loops: int  # acquire + activate + release per timing sample
    request_px: int
    request_steps: int
    request_repeats: int
    forward_repeats: int  # rounds of base / ours / diffusers UNet forwards
    no_hooks: bool  # also run the base request with our hooks removed (idle-hook cost)
    mixed_requests: int
    mixed_px: int
    mixed_steps: int
    mixed_repeats: int
    mem_adapters: int
    mem_device_slots: int
    mem_swaps: int
    mem_forward: bool  # one UNet forward (batch 1) inside every swap
    mem_forward_px: int
    file_dtype: str = "fp16"
    warmup: int = 1


SIZES: dict[tuple[str, bool], Sizes] = {
    ("tiny", False): Sizes(
        rank=4,
        adapters=64,
        resident=(1, 4, 16, 64),
        cold_repeats=15,
        hotswap_repeats=15,
        set_adapters_calls=20,
        switch_loops=20000,
        switch_samples=15,
        acquire_loops=3000,
        request_px=64,
        request_steps=20,
        request_repeats=5,
        forward_repeats=10,
        no_hooks=True,
        mixed_requests=8,
        mixed_px=64,
        mixed_steps=20,
        mixed_repeats=3,
        mem_adapters=50,
        mem_device_slots=8,
        mem_swaps=2000,
        mem_forward=True,
        mem_forward_px=16,
    ),
    ("tiny", True): Sizes(
        rank=4,
        adapters=16,
        resident=(1, 4, 16),
        cold_repeats=3,
        hotswap_repeats=3,
        set_adapters_calls=5,
        switch_loops=500,
        switch_samples=3,
        acquire_loops=100,
        request_px=64,
        request_steps=4,
        request_repeats=2,
        forward_repeats=2,
        no_hooks=True,
        mixed_requests=8,
        mixed_px=64,
        mixed_steps=4,
        mixed_repeats=1,
        mem_adapters=16,
        mem_device_slots=4,
        mem_swaps=200,
        mem_forward=True,
        mem_forward_px=16,
    ),
    ("sd15", False): Sizes(
        rank=16,
        adapters=64,
        resident=(1, 4, 16, 64),
        cold_repeats=7,
        hotswap_repeats=5,
        set_adapters_calls=7,
        switch_loops=20000,
        switch_samples=15,
        acquire_loops=2000,
        request_px=128,
        request_steps=4,
        request_repeats=3,
        forward_repeats=4,
        no_hooks=False,
        mixed_requests=8,
        mixed_px=128,
        mixed_steps=2,
        mixed_repeats=1,
        mem_adapters=50,
        mem_device_slots=8,
        mem_swaps=2000,
        mem_forward=False,
        mem_forward_px=64,
    ),
    ("sd15", True): Sizes(
        rank=16,
        adapters=4,
        resident=(1, 4),
        cold_repeats=2,
        hotswap_repeats=1,
        set_adapters_calls=2,
        switch_loops=200,
        switch_samples=2,
        acquire_loops=20,
        request_px=64,
        request_steps=1,
        request_repeats=1,
        forward_repeats=1,
        no_hooks=False,
        mixed_requests=4,
        mixed_px=64,
        mixed_steps=1,
        mixed_repeats=1,
        mem_adapters=4,
        mem_device_slots=2,
        mem_swaps=40,
        mem_forward=False,
        mem_forward_px=64,
    ),
}

# On CUDA the whole sd15 run is cheap: use SD1.5's real 512 px and 20 steps for the request numbers.
CUDA_OVERRIDES: dict[str, dict[str, Any]] = {
    "sd15": {
        "request_px": 512,
        "request_steps": 20,
        "request_repeats": 5,
        "forward_repeats": 10,
        "no_hooks": True,
        "mixed_px": 512,
        "mixed_steps": 20,
        "mixed_repeats": 3,
        "mem_forward": True,
        "mem_forward_px": 512,
    }
}


# -- small helpers ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()``; a garbage collection first, so no earlier garbage is charged to it."""
    gc.collect()
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def paired(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of per-round ratios: measurements taken back to back share the machine's load."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


def flatness(values: Sequence[float]) -> float:
    return max(values) / min(values)


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")


def cuda_memory(device: torch.device) -> dict[str, int] | None:
    if device.type != "cuda":
        return None
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()[:1]}] {message}", file=sys.stderr, flush=True)


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("service").setLevel(logging.WARNING)


# -- the model and the adapter files -----------------------------------------------------------------


def build_pipeline(shape: str) -> Any:
    """tiny-sd, or an SD1.5-shaped random-init pipeline from the shipped configs (nothing downloaded)."""
    if shape == "tiny":
        from basemodel.tiny import build_tiny_pipeline

        return build_tiny_pipeline()
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from basemodel.single_file import SD15_CONFIG_DIR, build_clip_tokenizer

    def config(name: str) -> dict[str, Any]:
        return dict(json.loads((SD15_CONFIG_DIR / name / "config.json").read_text()))

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config("unet"))
    vae = AutoencoderKL.from_config(config("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
    scheduler_config = json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peft_layout(unet: torch.nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """PEFT's LoRA keys and shapes for ``unet`` (injected into a weightless meta-device copy)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        skeleton = type(unet).from_config(unet.config)  # type: ignore[attr-defined]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=False)
    inject_adapter_in_model(config, skeleton)
    return {key: tuple(t.shape) for key, t in get_peft_model_state_dict(skeleton).items()}


def write_adapter_files(
    layout: dict[str, tuple[int, ...]], count: int, dtype: torch.dtype, folder: Path
) -> list[Path]:
    """``count`` adapters with distinct seeded values; nn.Linear's default init as peft leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1234)
    files = []
    for index in range(count):
        tensors = {}
        for key, shape in layout.items():
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform(a=√5) of nn.Linear(in=shape[1])
            values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            tensors[f"unet.{key}"] = values.to(dtype).contiguous()
        path = folder / f"lora_{index:02d}.safetensors"
        safetensors.torch.save_file(tensors, str(path))
        files.append(path)
    return files


# -- shared state ------------------------------------------------------------------------------------


@dataclass
class Bench:
    shape: str
    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    pipe: Any
    manager: LoRAModelManager
    registry: Registry
    versions: list[AdapterVersion]
    files: list[Path]
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> LocalStore:
        store = self.registry.store
        assert isinstance(store, LocalStore)
        return store

    def blob(self, version: AdapterVersion) -> Path:
        return self.store.root / blob_key(version.sha256)

    def new_cache(self, device_bytes: int, host_bytes: int) -> tuple[AdapterCache, Metrics]:
        metrics = Metrics()
        cache = AdapterCache(
            self.registry,
            self.manager.targets,
            self.device,
            self.dtype,
            Budgets(device_bytes=device_bytes, host_bytes=host_bytes, disk_bytes=1 << 40),
            self.workdir / "disk-cache",
            metrics,
        )
        return cache, metrics

    def params(
        self, px: int, steps: int, seed: int = 0, adapters: tuple[AppliedAdapter, ...] = ()
    ) -> SampleParams:
        return SampleParams(PROMPT, "", steps, GUIDANCE, px, px, seed, 1, SCHEDULER, adapters)

    def applied(self, index: int, adapter: DeviceAdapter) -> AppliedAdapter:
        return AppliedAdapter(self.versions[index], adapter, 1.0)

    def reinstall_hooks(self) -> None:
        self.manager = LoRAModelManager(self.pipe.unet, self.pipe.text_encoder)


@contextmanager
def phase(bench: Bench, name: str) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {"load_average_start": loadavg()}
    log(f"{name} …")
    started = time.perf_counter()
    try:
        yield out
    except Exception as exc:  # record it and go on with the other phases
        out["error"] = "".join(traceback.format_exception(exc))
        log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        with suppress(Exception):
            bench.pipe.unload_lora_weights()
    finally:
        out["wall_s"] = round(time.perf_counter() - started, 2)
        out["load_average_end"] = loadavg()
        bench.results[name] = out
        log(f"{name} done in {out['wall_s']} s")


def assert_no_peft_layers(bench: Bench) -> None:
    """After diffusers' unload, the UNet holds its original modules (the ones our hooks sit on)."""
    modules = dict(bench.pipe.unet.named_modules())
    for name, module in bench.manager.targets.items():
        if name.startswith("unet."):
            assert modules.get(name[len("unet.") :]) is module, f"{name} was replaced"
    assert not any("lora_" in name for name in modules), "peft layers left in the UNet"


# -- 1. cold load ------------------------------------------------------------------------------------


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


def bench_cold(bench: Bench) -> None:
    s, device, pipe = bench.sizes, bench.device, bench.pipe
    n = len(bench.versions)
    with phase(bench, "cold_load") as out:
        cache, _ = bench.new_cache(device_bytes=1 << 40, host_bytes=1 << 40)
        keys = [
            "read_bytes",
            "read_and_parse",
            "ours_cache",
            "ours_lite",
            "diffusers_load",
            "diffusers_unload",
            "diffusers_load_unload",
        ]
        steps = ["store_read", "sha256", "header_check_and_parse", "check_canonical", "device_build"]
        samples: dict[str, list[float]] = {k: [] for k in keys}
        breakdown: dict[str, list[float]] = {k: [] for k in steps}
        limits = bench.registry.limits
        architecture = bench.registry.base.architecture if bench.registry.base else None
        for rep in range(s.warmup + s.cold_repeats):
            index = rep % n
            version, blob, file = bench.versions[index], bench.blob(bench.versions[index]), bench.files[index]
            row: dict[str, float] = {}
            row["read_bytes"] = timed(blob.read_bytes, device)
            row["read_and_parse"] = timed(partial(read_and_parse, blob), device)
            lite = partial(load_lite, blob, bench.manager.targets, device, bench.dtype)
            jobs = [partial(cold_ours, cache, version, device), partial(cold_diffusers, pipe, file, device)]
            for job in jobs if rep % 2 == 0 else jobs[::-1]:
                row.update(job())
            row["ours_lite"] = timed(lite, device)
            # where our cold load's time goes: the same calls AdapterCache._load makes, one by one
            step: dict[str, float] = {}
            started = time.perf_counter()
            data = bench.registry.read_blob(version)
            step["store_read"] = time.perf_counter() - started
            started = time.perf_counter()
            assert hashlib.sha256(data).hexdigest() == version.sha256
            step["sha256"] = time.perf_counter() - started
            started = time.perf_counter()
            tensors, _ = read_adapter(
                data, limits=Limits(max_bytes=len(data), max_header_bytes=limits.max_header_bytes)
            )
            step["header_check_and_parse"] = time.perf_counter() - started
            started = time.perf_counter()
            check_canonical(tensors, architecture)
            step["check_canonical"] = time.perf_counter() - started
            build = partial(
                DeviceAdapter.build,
                "x",
                tensors,
                bench.manager.targets,
                device,
                bench.dtype,
                non_blocking=device.type == "cuda",
            )
            step["device_build"] = timed(build, device)
            if rep >= s.warmup:
                for key in keys:
                    samples[key].append(row[key])
                for key in steps:
                    breakdown[key].append(step[key])
        cache.close()
        assert_no_peft_layers(bench)

        # diffusers' own hot-swap: replace the weights of an already loaded adapter in place
        hotswap: list[float] = []
        hotswap_error = None
        try:
            pipe.load_lora_weights(str(bench.files[0]), adapter_name="slot")
            for rep in range(s.warmup + s.hotswap_repeats):
                file = bench.files[(rep + 1) % n]
                load = partial(pipe.load_lora_weights, str(file), adapter_name="slot", hotswap=True)
                t = timed(load, device)
                if rep >= s.warmup:
                    hotswap.append(t)
        except Exception as exc:  # an API difference must not sink the whole run
            hotswap_error = f"{type(exc).__name__}: {exc}"
        finally:
            pipe.unload_lora_weights()
        assert_no_peft_layers(bench)

        med = {k: median(v) for k, v in samples.items()}
        med["diffusers_hotswap"] = median(hotswap)
        out.update(
            file_bytes=bench.blob(bench.versions[0]).stat().st_size,
            peft_file_bytes=bench.files[0].stat().st_size,
            median_s=med,
            breakdown_median_s={k: median(v) for k, v in breakdown.items()},
            samples_s=samples | {"diffusers_hotswap": hotswap},
            hotswap_error=hotswap_error,
            ratio_load_unload_over_ours=paired(samples["diffusers_load_unload"], samples["ours_cache"]),
            ratio_ours_over_read_bytes=paired(samples["ours_cache"], samples["read_bytes"]),
            ratio_ours_over_read_and_parse=paired(samples["ours_cache"], samples["read_and_parse"]),
            ratio_load_unload_over_lite=paired(samples["diffusers_load_unload"], samples["ours_lite"]),
            ratio_lite_over_read_bytes=paired(samples["ours_lite"], samples["read_bytes"]),
            ratio_hotswap_over_ours=med["diffusers_hotswap"] / med["ours_cache"],
            note="files in the page cache (warm reads); diffusers' low_cpu_mem_usage left at its default",
        )


# -- 2./3. warm switch vs resident count -------------------------------------------------------------


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


def bench_switch(bench: Bench) -> None:
    s, device, pipe = bench.sizes, bench.device, bench.pipe
    counts = [c for c in s.resident if c <= len(bench.versions)]
    with phase(bench, "switch") as out:
        # diffusers: load adapters one by one; at each resident count, time set_adapters switches
        theirs: dict[int, list[float]] = {}
        load_times: list[float] = []
        loaded = 0
        for count in counts:
            while loaded < count:
                load = partial(pipe.load_lora_weights, str(bench.files[loaded]), adapter_name=f"a{loaded}")
                load_times.append(timed(load, device))
                loaded += 1
            names = [f"a{j}" for j in range(count)]
            pipe.set_adapters([names[0]], [1.0])  # warm-up
            calls = []
            for call in range(s.set_adapters_calls):
                name = names[(call + 1) % count]
                calls.append(timed(partial(pipe.set_adapters, [name], [1.0]), device))
            theirs[count] = calls
            log(f"  diffusers set_adapters with {count} loaded: {fmt_s(median(calls))}")
        unload_all = timed(pipe.unload_lora_weights, device)
        assert_no_peft_layers(bench)

        # ours: one cache per resident count, holding exactly `count` device-resident adapters; the
        # counts are sampled round-robin so load swings on a shared machine hit every count alike
        activate: dict[int, list[float]] = {count: [] for count in counts}
        acquire: dict[int, list[float]] = {count: [] for count in counts}
        loops: dict[int, tuple[Callable[[], None], Callable[[], Any]]] = {}
        caches = []
        for count in counts:
            cache, _ = bench.new_cache(device_bytes=1 << 40, host_bytes=1 << 40)
            caches.append(cache)
            versions = bench.versions[:count]
            pool = [cache.load_blocking(v) for v in versions]
            loops[count] = (
                partial(activate_loop, bench.manager, pool, s.switch_loops),
                partial(acquire_loop, cache, bench.manager, versions, s.acquire_loops),
            )
            loops[count][0]()  # warm-up
            asyncio.run(loops[count][1]())
        for _ in range(s.switch_samples):
            for count in counts:
                switch, path = loops[count]
                activate[count].append(timed(switch, device) / s.switch_loops)
                gc.collect()
                acquire[count].append(asyncio.run(path()))
        for cache in caches:
            cache.close()
        for count in counts:
            log(
                f"  ours with {count} resident: activate {fmt_s(median(activate[count]))}, "
                f"acquire+activate+release {fmt_s(median(acquire[count]))}"
            )

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
        act = [r["ours_activate_s"] for r in rows]
        acq = [r["ours_acquire_activate_release_s"] for r in rows]
        their = [r["diffusers_set_adapters_s"] for r in rows]
        out.update(
            rows=rows,
            ours_activate_flatness=flatness(act),
            ours_acquire_path_flatness=flatness(acq),
            ours_activate_flatness_of_minima=flatness([r["ours_activate_min_s"] for r in rows]),
            ours_acquire_path_flatness_of_minima=flatness(
                [r["ours_acquire_activate_release_min_s"] for r in rows]
            ),
            diffusers_growth_last_over_first=their[-1] / their[0],
            diffusers_load_s_by_resident_before=load_times,
            diffusers_unload_all_s=unload_all,
            samples_s={
                "diffusers_set_adapters": {str(k): v for k, v in theirs.items()},
                "ours_activate": {str(k): v for k, v in activate.items()},
                "ours_acquire_activate_release": {str(k): v for k, v in acquire.items()},
            },
            note=(
                "ours_activate = entering + leaving manager.activate([ActiveLoRA(adapter, 1.0)]) for the "
                "next resident adapter (the per-request cost in the worker); the acquire path adds "
                "AdapterCache.acquire (device hit) + release, run in an asyncio loop"
            ),
        )


# -- 4. per-request latency --------------------------------------------------------------------------


def images_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Largest per-pixel difference (0…255) between two lists of PIL images."""
    return float(
        max(
            np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()
            for x, y in zip(a, b, strict=True)
        )
    )


def bench_request(bench: Bench) -> None:
    s, device = bench.sizes, bench.device
    with phase(bench, "request") as out:
        cache, _ = bench.new_cache(device_bytes=1 << 40, host_bytes=1 << 40)
        adapter = cache.load_blocking(bench.versions[0])
        base = bench.params(s.request_px, s.request_steps, seed=7)
        with_lora = replace(base, adapters=(bench.applied(0, adapter),))
        images: dict[str, list[Any]] = {}
        stages: dict[str, list[dict[str, float]]] = {"base": [], "adapter": [], "base_without_hooks": []}

        def run(params: SampleParams, label: str) -> float:
            box: list[Any] = []
            timer = StageTimer()
            t = timed(
                lambda: box.extend(sample_batch(bench.pipe, [params], timer, lora=bench.manager)),
                device,
            )
            images[label] = box[0]
            stages.setdefault(label, []).append(timer.seconds)
            return t

        run(replace(base, steps=1), "warm-up")
        run(replace(with_lora, steps=1), "warm-up")
        # variants run back to back in a rotating order; ratios are medians of per-round ratios
        variants = [("base", base), ("adapter", with_lora)]
        if s.no_hooks:  # the base request with our hooks removed: what idle hooks cost
            variants.append(("base_without_hooks", base))
        samples: dict[str, list[float]] = {label: [] for label, _ in variants}
        for rep in range(s.request_repeats):
            shift = rep % len(variants)
            order = variants[shift:] + variants[:shift]
            for label, params in order if rep % 2 == 0 else order[::-1]:
                if label == "base_without_hooks":
                    bench.manager.remove()
                    try:
                        samples[label].append(run(params, label))
                    finally:
                        bench.reinstall_hooks()
                else:
                    samples[label].append(run(params, label))
            log(f"  request rep {rep}: " + ", ".join(f"{k} {fmt_s(v[-1])}" for k, v in samples.items()))
        no_hooks = samples.pop("base_without_hooks", [])
        cache.close()
        med = {k: median(v) for k, v in samples.items()}
        med["base_without_hooks"] = median(no_hooks)
        out.update(
            px=s.request_px,
            steps=s.request_steps,
            guidance_scale=GUIDANCE,
            scheduler=SCHEDULER,
            median_s=med,
            samples_s=samples | {"base_without_hooks": no_hooks},
            stage_s={k: v for k, v in stages.items() if k != "warm-up"},
            ratio_adapter_over_base=paired(samples["adapter"], samples["base"]),
            ratio_base_over_no_hooks=paired(samples["base"], no_hooks) if no_hooks else None,
            adapter_changes_image_max_diff=images_diff(images["base"], images["adapter"]),
            no_hooks_image_equals_base=(
                images_diff(images["base"], images["base_without_hooks"]) == 0 if no_hooks else None
            ),
        )


def bench_unet_step(bench: Bench) -> None:
    """One CFG-shaped UNet forward (batch 2): base, our hooks, diffusers' peft layers, same file.

    Checks that ours and diffusers compute the same thing, and times the LoRA cost per denoising step
    for both (diffusers' adapter is loaded before and unloaded after its timed forward).
    """
    s, device, pipe = bench.sizes, bench.device, bench.pipe
    with phase(bench, "unet_step") as out:
        latent = s.request_px // int(pipe.vae_scale_factor)
        generator = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, latent, latent, generator=generator).to(device, bench.dtype)
        hidden_size = int(pipe.text_encoder.config.hidden_size)
        hidden = torch.randn(2, 77, hidden_size, generator=generator).to(device, bench.dtype)
        cache, _ = bench.new_cache(device_bytes=1 << 40, host_bytes=1 << 40)
        adapter = cache.load_blocking(bench.versions[0])
        outputs: dict[str, torch.Tensor] = {}

        @torch.no_grad()
        def forward(label: str) -> None:
            result = pipe.unet(x, 500, encoder_hidden_states=hidden, return_dict=False)[0]
            outputs[label] = torch.as_tensor(result).float()

        def base() -> float:
            return timed(partial(forward, "base"), device)

        def ours() -> float:
            with bench.manager.activate([ActiveLoRA(adapter, 1.0)]):
                return timed(partial(forward, "ours"), device)

        def diffusers() -> float:
            pipe.load_lora_weights(str(bench.files[0]), adapter_name="step")
            try:
                return timed(partial(forward, "diffusers"), device)
            finally:
                pipe.unload_lora_weights()

        variants: list[tuple[str, Callable[[], float]]] = [
            ("base", base),
            ("ours", ours),
            ("diffusers", diffusers),
        ]
        for _, run in variants:  # warm-up, and the outputs compared below
            run()
        samples: dict[str, list[float]] = {label: [] for label, _ in variants}
        for rnd in range(s.forward_repeats):
            shift = rnd % len(variants)
            for label, run in variants[shift:] + variants[:shift]:
                samples[label].append(run())
        cache.close()
        assert_no_peft_layers(bench)
        effect = float((outputs["diffusers"] - outputs["base"]).abs().max())
        diff = float((outputs["ours"] - outputs["diffusers"]).abs().max())
        out.update(
            px=s.request_px,
            batch=2,
            median_s={k: median(v) for k, v in samples.items()},
            samples_s=samples,
            ratio_ours_over_base=paired(samples["ours"], samples["base"]),
            ratio_diffusers_over_base=paired(samples["diffusers"], samples["base"]),
            lora_effect_max_abs=effect,
            ours_vs_diffusers_max_abs=diff,
            relative=diff / effect if effect else None,
        )
        log(f"  ours vs diffusers: max |Δ| {diff:.3g} (LoRA effect {effect:.3g})")


# -- 5. mixed batch ----------------------------------------------------------------------------------


def bench_mixed(bench: Bench) -> None:
    s, device = bench.sizes, bench.device
    count = min(s.mixed_requests, len(bench.versions))
    with phase(bench, "mixed") as out:
        cache, _ = bench.new_cache(device_bytes=1 << 40, host_bytes=1 << 40)
        applied = tuple(bench.applied(i, cache.load_blocking(bench.versions[i])) for i in range(count))

        def requests(steps: int) -> list[SampleParams]:
            return [
                bench.params(s.mixed_px, steps, seed=100 + i, adapters=(applied[i],)) for i in range(count)
            ]

        def mixed(batch: list[SampleParams]) -> list[list[Any]]:
            return sample_batch(bench.pipe, batch, StageTimer(), lora=bench.manager)

        def sequential(batch: list[SampleParams]) -> list[list[Any]]:
            return [sample_batch(bench.pipe, [p], StageTimer(), lora=bench.manager)[0] for p in batch]

        warm = requests(1)
        mixed(warm)
        sequential(warm[:1])
        batch = requests(s.mixed_steps)
        samples: dict[str, list[float]] = {"mixed": [], "sequential": []}
        outputs: dict[str, list[list[Any]]] = {}
        for rep in range(s.mixed_repeats):
            runs: list[tuple[str, Callable[[list[SampleParams]], list[list[Any]]]]] = [
                ("mixed", mixed),
                ("sequential", sequential),
            ]
            for label, fn in runs if rep % 2 == 0 else runs[::-1]:
                box: list[list[Any]] = []
                samples[label].append(timed(lambda: box.extend(fn(batch)), device))  # noqa: B023
                outputs[label] = box
            log(
                f"  mixed rep {rep}: mixed {fmt_s(samples['mixed'][-1])}, "
                f"sequential {fmt_s(samples['sequential'][-1])}"
            )
        cache.close()
        med = {k: median(v) for k, v in samples.items()}
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


# -- 6. memory over many swaps -----------------------------------------------------------------------


def bench_memory(bench: Bench) -> None:
    s, device = bench.sizes, bench.device
    count = min(s.mem_adapters, len(bench.versions))
    versions = bench.versions[:count]
    with phase(bench, "memory") as out:
        probe_cache, _ = bench.new_cache(device_bytes=1 << 40, host_bytes=1 << 40)
        adapter_bytes = probe_cache.load_blocking(versions[0]).nbytes
        probe_cache.close()
        del probe_cache
        host_budget = sum(v.size for v in versions) * 2  # every file fits the host tier
        cache, metrics = bench.new_cache(
            device_bytes=s.mem_device_slots * adapter_bytes, host_bytes=host_budget
        )
        latent = s.mem_forward_px // int(bench.pipe.vae_scale_factor)
        x = torch.randn(1, 4, latent, latent).to(device, bench.dtype)
        hidden = torch.randn(1, 77, int(bench.pipe.text_encoder.config.hidden_size)).to(device, bench.dtype)
        rng = random.Random(0)
        trace: list[dict[str, float]] = []
        every = max(1, s.mem_swaps // 8)

        async def swap(version: AdapterVersion) -> None:
            adapter = await cache.acquire(version)
            try:
                with bench.manager.activate([ActiveLoRA(adapter, 1.0)]), torch.no_grad():
                    if s.mem_forward:
                        bench.pipe.unet(x, 500, encoder_hidden_states=hidden, return_dict=False)
            finally:
                cache.release(version)

        async def run() -> dict[str, Any]:
            for version in versions:  # pre-warm: host tier full, device tier at its budget
                await swap(version)
            for version in versions[:4]:
                await swap(version)
            gc.collect()
            sync(device)
            before, cuda_before = rss_bytes(), cuda_memory(device)
            started = time.perf_counter()
            for k in range(s.mem_swaps):
                await swap(versions[rng.randrange(count)])
                if (k + 1) % every == 0:
                    trace.append({"swaps": k + 1, "rss_mib": rss_bytes() / MIB})
            sync(device)
            elapsed = time.perf_counter() - started
            gc.collect()
            after, cuda_after = rss_bytes(), cuda_memory(device)
            return {
                "rss_before_bytes": before,
                "rss_after_bytes": after,
                "cuda_before": cuda_before,
                "cuda_after": cuda_after,
                "elapsed_s": elapsed,
            }

        result = asyncio.run(run())
        registry = metrics.registry

        def counter(name: str, tier: str) -> float:
            return float(
                registry.get_sample_value(f"loraswap_adapter_cache_{name}_total", {"tier": tier}) or 0
            )

        resident = len(cache.resident())
        cache.close()
        before, after = result["rss_before_bytes"], result["rss_after_bytes"]
        cuda_growth = None
        if result["cuda_before"] is not None:
            cb, ca = result["cuda_before"]["allocated"], result["cuda_after"]["allocated"]
            cuda_growth = 100.0 * (ca - cb) / cb if cb else None
        out.update(
            adapters=count,
            device_slots=s.mem_device_slots,
            device_budget_bytes=s.mem_device_slots * adapter_bytes,
            adapter_device_bytes=adapter_bytes,
            host_budget_bytes=host_budget,
            swaps=s.mem_swaps,
            swap=(
                "await cache.acquire(v) + manager.activate([ActiveLoRA]) "
                + (
                    f"+ one UNet forward (batch 1, {s.mem_forward_px} px) "
                    if s.mem_forward
                    else "(no forward) "
                )
                + "+ cache.release(v); v uniform at random over the adapters"
            ),
            mean_swap_s=result["elapsed_s"] / s.mem_swaps,
            device_hits=counter("hits", "device"),
            device_misses=counter("misses", "device"),
            host_hits=counter("hits", "host"),
            device_evictions=counter("evictions", "device"),
            device_resident_at_end=resident,
            rss_trace_mib=trace,
            growth_pct=100.0 * (after - before) / before,
            growth_mib=(after - before) / MIB,
            cuda_allocated_growth_pct=cuda_growth,
            **result,
        )


# -- report ------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def report(bench: Bench) -> list[list[str]]:
    r = {name: out for name, out in bench.results.items() if "error" not in out}
    rows: list[list[str]] = [["measure", "ours", "baseline", "ratio", "target", "verdict"]]
    if "cold_load" in r:
        c = r["cold_load"]
        m = c["median_s"]
        ratio, read = c["ratio_load_unload_over_ours"], c["ratio_ours_over_read_bytes"]
        lite, lite_read = c["ratio_load_unload_over_lite"], c["ratio_lite_over_read_bytes"]
        ours, theirs = fmt_s(m["ours_cache"]), fmt_s(m["diffusers_load_unload"])
        rows += [
            [
                "cold load: ours (AdapterCache, host tier empty) vs load_lora_weights+unload",
                ours,
                theirs,
                f"{ratio:.1f}× faster",
                "≥20× faster",
                verdict(ratio >= TARGETS["cold_vs_load_unload"]),
            ],
            [
                "  ours (cache) vs Path.read_bytes of the file",
                ours,
                fmt_s(m["read_bytes"]),
                f"{read:.1f}× the read",
                "≤3× the read",
                verdict(read <= TARGETS["cold_vs_read"]),
            ],
            [
                "  ours (cache) vs read_bytes + safetensors.torch.load",
                ours,
                fmt_s(m["read_and_parse"]),
                f"{c['ratio_ours_over_read_and_parse']:.1f}× read+parse",
                "(info)",
                "",
            ],
            [
                "  ours (cache) vs diffusers load_lora_weights(hotswap=True)",
                ours,
                fmt_s(m["diffusers_hotswap"]),
                f"{c['ratio_hotswap_over_ours']:.1f}× faster",
                "(info)",
                "",
            ],
            [
                "cold load: ours lite (read + read_adapter + build) vs load+unload",
                fmt_s(m["ours_lite"]),
                theirs,
                f"{lite:.1f}× faster",
                "≥20× faster",
                verdict(lite >= TARGETS["cold_vs_load_unload"]),
            ],
            [
                "  ours lite vs Path.read_bytes of the file",
                fmt_s(m["ours_lite"]),
                fmt_s(m["read_bytes"]),
                f"{lite_read:.1f}× the read",
                "≤3× the read",
                verdict(lite_read <= TARGETS["cold_vs_read"]),
            ],
        ]
        b = c["breakdown_median_s"]
        rows.append(
            ["  ours (cache) breakdown: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in b.items())] + [""] * 5
        )
    if "switch" in r:
        sw = r["switch"]
        for row in sw["rows"]:
            rows.append(
                [
                    f"warm switch, {row['resident']} resident: activate vs set_adapters",
                    fmt_s(row["ours_activate_s"]),
                    fmt_s(row["diffusers_set_adapters_s"]),
                    f"{row['ratio_set_adapters_over_activate']:.0f}× faster",
                    "≥50× faster",
                    verdict(row["ratio_set_adapters_over_activate"] >= TARGETS["switch_vs_set_adapters"]),
                ]
            )
            rows.append(
                [
                    "  same, with cache acquire + release",
                    fmt_s(row["ours_acquire_activate_release_s"]),
                    fmt_s(row["diffusers_set_adapters_s"]),
                    f"{row['ratio_set_adapters_over_acquire_path']:.0f}× faster",
                    "≥50× faster",
                    verdict(row["ratio_set_adapters_over_acquire_path"] >= TARGETS["switch_vs_set_adapters"]),
                ]
            )
        span = f"{sw['rows'][0]['resident']}→{sw['rows'][-1]['resident']}"
        for label, key in (("activate", "ours_activate"), ("acquire+activate+release", "ours_acquire_path")):
            growth = sw[f"{key}_flatness"]
            rows.append(
                [
                    f"switch cost {span} resident, ours {label}: slowest/fastest median (of minima)",
                    f"{growth:.2f}× ({sw[f'{key}_flatness_of_minima']:.2f}×)",
                    "",
                    "",
                    "flat (≤1.5×)",
                    verdict(growth <= TARGETS["switch_flat"]),
                ]
            )
        rows.append(
            [
                f"switch cost {span} resident, diffusers set_adapters: last/first",
                "",
                f"{sw['diffusers_growth_last_over_first']:.2f}×",
                "",
                "(grows)",
                "",
            ]
        )
    if "unet_step" in r:
        u = r["unet_step"]
        m = u["median_s"]
        for label, key in (("ours (hooks)", "ours"), ("diffusers (peft layers)", "diffusers")):
            rows.append(
                [
                    f"UNet step, batch 2, {u['px']} px: {label} with adapter vs base",
                    fmt_s(m[key]) if key == "ours" else "",
                    fmt_s(m["base"]) if key == "ours" else fmt_s(m[key]),
                    f"{u[f'ratio_{key}_over_base']:.3f}×",
                    "(info)",
                    "",
                ]
            )
    if "request" in r:
        q = r["request"]
        m = q["median_s"]
        rows.append(
            [
                f"request {q['px']} px, {q['steps']} steps, CFG: adapter vs base",
                fmt_s(m["adapter"]),
                fmt_s(m["base"]),
                f"{q['ratio_adapter_over_base']:.3f}×",
                "≤1.10×",
                verdict(q["ratio_adapter_over_base"] <= TARGETS["request_overhead"]),
            ]
        )
        if q["ratio_base_over_no_hooks"] is not None:
            rows.append(
                [
                    "  base with idle hooks vs no hooks installed",
                    fmt_s(m["base"]),
                    fmt_s(m["base_without_hooks"]),
                    f"{q['ratio_base_over_no_hooks']:.3f}×",
                    "(info)",
                    "",
                ]
            )
    if "mixed" in r:
        x = r["mixed"]
        m = x["median_s"]
        target_applies = bench.device.type == "cuda"
        rows.append(
            [
                f"{x['requests']} requests, own adapters, {x['px']} px, {x['steps']} steps: mixed vs seq.",
                fmt_s(m["mixed"]),
                fmt_s(m["sequential"]),
                f"{x['ratio_sequential_over_mixed']:.2f}× throughput",
                "≥1.5× (CUDA target)",
                verdict(x["ratio_sequential_over_mixed"] >= TARGETS["mixed_speedup"])
                if target_applies
                else "n/a on CPU",
            ]
        )
    if "memory" in r:
        mem = r["memory"]
        rows.append(
            [
                f"RSS, {mem['swaps']} swaps, {mem['adapters']} adapters, device tier {mem['device_slots']}",
                f"{mem['rss_before_bytes'] / MIB:.0f} → {mem['rss_after_bytes'] / MIB:.0f} MiB",
                "",
                f"{mem['growth_pct']:+.2f} %",
                "≤2 %",
                verdict(mem["growth_pct"] <= TARGETS["memory_growth_pct"]),
            ]
        )
        if mem["cuda_allocated_growth_pct"] is not None:
            rows.append(
                [
                    "  CUDA memory allocated",
                    f"{mem['cuda_before']['allocated'] / MIB:.0f} → "
                    f"{mem['cuda_after']['allocated'] / MIB:.0f} MiB",
                    "",
                    f"{mem['cuda_allocated_growth_pct']:+.2f} %",
                    "≤2 %",
                    verdict(mem["cuda_allocated_growth_pct"] <= TARGETS["memory_growth_pct"]),
                ]
            )
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        if all(not cell for cell in row[1:]):  # a note spanning the table
            lines.append("| " + row[0] + " |" + " |" * (len(row) - 1))
            continue
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path | torch.device | torch.dtype):
        return str(value)
    return value


# -- main --------------------------------------------------------------------------------------------

PHASES: dict[str, Callable[[Bench], None]] = {
    "cold": bench_cold,
    "switch": bench_switch,
    "unet_step": bench_unet_step,
    "request": bench_request,
    "mixed": bench_mixed,
    "memory": bench_memory,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_swap", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shape", choices=["tiny", "sd15"], required=True)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    parser.add_argument(
        "--adapters", type=int, default=None, help="adapter files to generate (default per shape)"
    )
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run with tiny sizes")
    parser.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on CPU: 1 — on a shared machine oversubscribed OpenMP threads made "
        "every number 3-4× slower and noisy; on CUDA: torch's default)",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: loadtests/results/…)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    sizes = SIZES[(args.shape, args.quick)]
    if device.type == "cuda" and not args.quick:
        sizes = replace(sizes, **CUDA_OVERRIDES.get(args.shape, {}))
    if args.adapters is not None:
        if args.adapters < 2:
            print("--adapters must be at least 2", file=sys.stderr)
            return 2
        sizes = replace(sizes, adapters=args.adapters)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        print(f"unknown phase(s) {unknown}; choose from {list(PHASES)}", file=sys.stderr)
        return 2
    file_dtype = {"fp16": torch.float16, "fp32": torch.float32}[sizes.file_dtype]

    started = time.perf_counter()
    meta: dict[str, Any] = {
        "shape": args.shape,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "command": "python -m loadtests.bench_swap " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average_start": loadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    import diffusers
    import peft
    import transformers

    meta["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    rss_start = rss_bytes()

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        workdir = Path(tmp)
        log(f"building {args.shape} on {device} ({meta['dtype']})")
        pipe = build_pipeline(args.shape)
        pipe.to(device=device, dtype=dtype)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.eval()  # as from_pretrained leaves them (built models start in training mode)
        unet_params = sum(p.numel() for p in pipe.unet.parameters())
        text_params = sum(p.numel() for p in pipe.text_encoder.parameters())
        identity = BaseIdentity(
            name=f"bench-{args.shape}",
            fingerprint=hashlib.sha256(f"bench-swap/{args.shape}/seed0".encode()).hexdigest(),
            architecture=architecture_of(pipe.unet, pipe.text_encoder, family=family_of(pipe)),
        )
        log(f"writing {sizes.adapters} rank-{sizes.rank} adapter files ({sizes.file_dtype})")
        layout = peft_layout(pipe.unet, sizes.rank)
        files = write_adapter_files(layout, sizes.adapters, file_dtype, workdir / "files")
        registry = Registry(LocalStore(workdir / "store"), identity, max_rank=max(64, sizes.rank))
        versions = [registry.register(path, f"bench-{i:02d}") for i, path in enumerate(files)]
        manager = LoRAModelManager(pipe.unet, pipe.text_encoder)
        bench = Bench(args.shape, sizes, device, dtype, pipe, manager, registry, versions, files, workdir)
        meta.update(
            unet_params=unet_params,
            text_encoder_params=text_params,
            lora_modules=len(layout) // 2,
            lora_rank=sizes.rank,
            lora_targets=TARGET_MODULES,
            adapter_file_bytes=files[0].stat().st_size,
            adapter_file_dtype=sizes.file_dtype,
            hooked_modules=len(manager.targets),
            sizes=asdict(sizes),
            rss_at_start_bytes=rss_start,
            rss_after_setup_bytes=rss_bytes(),
            setup_s=round(time.perf_counter() - started, 2),
        )
        log(f"setup done in {meta['setup_s']} s ({len(layout) // 2} LoRA modules)")
        for name in phases:
            PHASES[name](bench)
        bench.manager.remove()

    meta["load_average_end"] = loadavg()
    meta["wall_s"] = round(time.perf_counter() - started, 2)
    rows = report(bench)
    table = render(rows)
    suffix = "-quick" if args.quick else ""
    output = args.output or RESULTS_DIR / f"bench_swap-{args.shape}-{device.type}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "targets": TARGETS, "results": bench.results, "table": table}
    output.write_text(json.dumps(jsonable(document), indent=2) + "\n")

    print(
        f"\nbench_swap --shape {args.shape} on {device} ({meta['dtype']}); {meta['cpu_count']} CPUs; "
        f"load average {meta['load_average_start']} → {meta['load_average_end']}; {meta['wall_s']} s"
    )
    print(
        f"adapters: {sizes.adapters} × rank {sizes.rank} on {meta['lora_modules']} attention modules, "
        f"{meta['adapter_file_bytes'] / MIB:.2f} MiB {sizes.file_dtype} each; "
        f"UNet {unet_params / 1e6:.0f}M params"
    )
    print(table)
    failed = [name for name, out in bench.results.items() if "error" in out]
    for name in failed:
        print(f"\nphase {name} failed:\n{bench.results[name]['error']}")
    print(f"\nJSON: {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
