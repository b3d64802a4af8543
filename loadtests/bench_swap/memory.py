"""Phase 6, memory over many swaps: process RSS (and CUDA memory) before/after random swaps over more
adapters than the device tier holds."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from adapters.records import AdapterVersion
from service.lora.cache import AdapterCache
from service.lora.model_manager import ActiveLoRA
from service.metrics import Metrics

from .config import MIB
from .fixtures import Bench, phase, random_unet_kwargs
from .machine import cuda_memory, rss_bytes
from .timing import sync


@dataclass
class Swapper:
    """One swap = acquire, activate (with an optional UNet forward inside), release."""

    bench: Bench
    cache: AdapterCache
    x: torch.Tensor
    conditioning: dict[str, Any]  # encoder_hidden_states (and SDXL's added conditioning)

    async def swap(self, version: AdapterVersion) -> None:
        adapter = await self.cache.acquire(version)
        try:
            with self.bench.manager.activate([ActiveLoRA(adapter, 1.0)]), torch.no_grad():
                if self.bench.sizes.mem_forward:
                    self.bench.pipe.unet(self.x, 500, **self.conditioning, return_dict=False)
        finally:
            self.cache.release(version)


def bench_memory(bench: Bench) -> None:
    s, device = bench.sizes, bench.device
    count = min(s.mem_adapters, len(bench.versions))
    versions = bench.versions[:count]
    with phase(bench, "memory") as out:
        adapter_bytes = device_bytes_per_adapter(bench, versions[0])
        host_budget = sum(v.size for v in versions) * 2  # every file fits the host tier
        cache, metrics = bench.new_cache(
            device_bytes=s.mem_device_slots * adapter_bytes, host_bytes=host_budget
        )
        latent = s.mem_forward_px // int(bench.pipe.vae_scale_factor)
        x = torch.randn(1, 4, latent, latent).to(device, bench.dtype)
        conditioning = random_unet_kwargs(bench, 1, s.mem_forward_px)
        trace: list[dict[str, float]] = []
        result = asyncio.run(swap_many(Swapper(bench, cache, x, conditioning), versions, trace))
        resident = len(cache.resident())
        cache.close()
        out.update(
            adapters=count,
            device_slots=s.mem_device_slots,
            device_budget_bytes=s.mem_device_slots * adapter_bytes,
            adapter_device_bytes=adapter_bytes,
            host_budget_bytes=host_budget,
            swaps=s.mem_swaps,
            swap=describe_swap(bench),
            mean_swap_s=result["elapsed_s"] / s.mem_swaps,
            **cache_counters(metrics),
            device_resident_at_end=resident,
            rss_trace_mib=trace,
            **growth(result),
            **result,
        )


def device_bytes_per_adapter(bench: Bench, version: AdapterVersion) -> int:
    probe_cache = bench.unbounded_cache()
    adapter_bytes = probe_cache.load_blocking(version).nbytes
    probe_cache.close()
    del probe_cache
    return adapter_bytes


async def swap_many(
    swapper: Swapper, versions: list[AdapterVersion], trace: list[dict[str, float]]
) -> dict[str, Any]:
    """Pre-warm, then ``mem_swaps`` swaps to adapters drawn at random; RSS sampled 8 times on the way."""
    s, device = swapper.bench.sizes, swapper.bench.device
    rng = random.Random(0)
    every = max(1, s.mem_swaps // 8)
    for version in versions:  # pre-warm: host tier full, device tier at its budget
        await swapper.swap(version)
    for version in versions[:4]:
        await swapper.swap(version)
    gc.collect()
    sync(device)
    before, cuda_before = rss_bytes(), cuda_memory(device)
    started = time.perf_counter()
    for k in range(s.mem_swaps):
        await swapper.swap(versions[rng.randrange(len(versions))])
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


def describe_swap(bench: Bench) -> str:
    s = bench.sizes
    forward = f"+ one UNet forward (batch 1, {s.mem_forward_px} px) " if s.mem_forward else "(no forward) "
    return (
        "await cache.acquire(v) + manager.activate([ActiveLoRA]) "
        + forward
        + "+ cache.release(v); v uniform at random over the adapters"
    )


def cache_counters(metrics: Metrics) -> dict[str, float]:
    registry = metrics.registry

    def counter(name: str, tier: str) -> float:
        return float(registry.get_sample_value(f"loraswap_adapter_cache_{name}_total", {"tier": tier}) or 0)

    return {
        "device_hits": counter("hits", "device"),
        "device_misses": counter("misses", "device"),
        "host_hits": counter("hits", "host"),
        "device_evictions": counter("evictions", "device"),
    }


def growth(result: dict[str, Any]) -> dict[str, float | None]:
    """RSS growth (percent and MiB) and CUDA allocated growth (percent) over the swaps."""
    before, after = result["rss_before_bytes"], result["rss_after_bytes"]
    cuda_growth = None
    if result["cuda_before"] is not None:
        cb, ca = result["cuda_before"]["allocated"], result["cuda_after"]["allocated"]
        cuda_growth = 100.0 * (ca - cb) / cb if cb else None
    return {
        "growth_pct": 100.0 * (after - before) / before,
        "growth_mib": (after - before) / MIB,
        "cuda_allocated_growth_pct": cuda_growth,
    }
