"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Fusing an adapter set takes from tens of microseconds (a parked set) to about a second (SD1.5 on CPU).
FUSE_BUCKETS = (1e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Generations take seconds: buckets reach minutes, with resolution at the sub-second end too.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class CudaMemory:
    """torch's CUDA caching-allocator figures for the model's device."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.allocated = Gauge(
            "loraswap_cuda_memory_allocated_bytes",
            "Bytes held by tensors on the model's CUDA device (torch.cuda.memory_allocated).",
            registry=registry,
        )
        self.reserved = Gauge(
            "loraswap_cuda_memory_reserved_bytes",
            "Bytes the caching allocator holds on the model's CUDA device (torch.cuda.memory_reserved).",
            registry=registry,
        )

    def update(self, device: torch.device) -> None:
        self.allocated.set(torch.cuda.memory_allocated(device))
        self.reserved.set(torch.cuda.memory_reserved(device))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "loraswap_request_duration_seconds",
            "HTTP request duration by route template, method and status.",
            ["route", "method", "status"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "loraswap_stage_duration_seconds",
            "Duration of generation stages (queue, text_encode, denoise, decode, encode).",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "loraswap_queue_depth", "Generation jobs waiting for the worker.", registry=r
        )
        self.in_flight = Gauge(
            "loraswap_generations_in_flight", "Generation jobs executing on the worker.", registry=r
        )
        self.images = Counter("loraswap_images_generated", "Images generated.", registry=r)
        self.generations = Counter(
            "loraswap_generations",
            "Generation requests completed, by mode: txt2img, img2img, inpaint.",
            ["mode"],
            registry=r,
        )
        self.errors = Counter("loraswap_errors", "Error responses by error type.", ["type"], registry=r)
        self.ready = Gauge("loraswap_ready", "1 once the model is loaded and warmed up.", registry=r)
        tier = ["tier"]
        self.cache_hits = Counter("loraswap_adapter_cache_hits", "Adapter cache hits.", tier, registry=r)
        self.cache_misses = Counter(
            "loraswap_adapter_cache_misses", "Adapter cache misses.", tier, registry=r
        )
        self.cache_evictions = Counter(
            "loraswap_adapter_cache_evictions", "Adapter cache evictions.", tier, registry=r
        )
        self.cache_bytes = Gauge(
            "loraswap_adapter_cache_bytes", "Bytes held per cache tier.", tier, registry=r
        )
        self.cache_entries = Gauge(
            "loraswap_adapter_cache_entries", "Adapters held per cache tier.", tier, registry=r
        )
        self.adapter_load = Histogram(
            "loraswap_adapter_load_seconds",
            "Time to make an adapter ready to run, by the tier it came from (host, disk, store).",
            ["source"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.adapter_corrupt = Counter(
            "loraswap_adapter_corrupt",
            "Adapter files that failed their recorded hash or could not be found, by where the bytes came "
            "from (store; disk: a disk tier copy, then fetched again) and reason (sha256_mismatch, "
            "blob_missing). Nothing is served from such bytes.",
            ["tier", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "loraswap_batch_size",
            "Requests per denoising batch.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.store_errors = Counter(
            "loraswap_store_errors",
            "Failed adapter store calls by operation (list, read, write, create, stat, delete), including "
            "calls refused at once by the open circuit breaker.",
            ["operation"],
            registry=r,
        )
        self.store_breaker = Gauge(
            "loraswap_store_breaker_state",
            "Adapter store circuit breaker: 0 closed, 1 half-open (probing), 2 open (failing fast).",
            registry=r,
        )
        self.adapter_registrations = Counter(
            "loraswap_adapter_registrations",
            "Adapter registrations over HTTP by outcome.",
            ["outcome"],
            registry=r,
        )
        self.jobs = Gauge(
            "loraswap_jobs", "Jobs (/v1/jobs) held by the server, by state.", ["state"], registry=r
        )
        self.jobs_created = Counter("loraswap_jobs_created", "Jobs submitted to /v1/jobs.", registry=r)
        self.jobs_ended = Counter(
            "loraswap_jobs_ended",
            "Jobs that ended, by state (succeeded, failed, cancelled).",
            ["state"],
            registry=r,
        )
        self.sse_subscribers = Gauge(
            "loraswap_sse_subscribers", "Open event streams (GET /v1/jobs/{id}/events).", registry=r
        )
        self.lora_path = Counter(
            "loraswap_lora_path",
            "Requests by the way their denoising batch applied adapters: none, fused or hooked.",
            ["path"],
            registry=r,
        )
        self.lora_fuse = Histogram(
            "loraswap_lora_fuse_seconds",
            "Time to fuse an adapter set into the UNet's weights (compute W + sum s*dW, swap it in).",
            buckets=FUSE_BUCKETS,
            registry=r,
        )
        self.lora_restore = Histogram(
            "loraswap_lora_restore_seconds",
            "Time to restore the UNet's loaded weights after a fused set.",
            buckets=FUSE_BUCKETS,
            registry=r,
        )
        self.lora_fused_bytes = Gauge(
            "loraswap_lora_fused_bytes",
            "Bytes of fused weights held (swapped in, or parked for a cheap re-fuse); at most the budget.",
            registry=r,
        )
        self.lora_fuse_budget = Gauge(
            "loraswap_lora_fuse_budget_bytes",
            "The fused weights' byte budget (lora_fuse_budget_mb).",
            registry=r,
        )
        self.lora_fused_modules = Gauge(
            "loraswap_lora_fused_modules",
            "UNet modules running on fused weights now (0: the loaded weights).",
            registry=r,
        )
        self._cuda: CudaMemory | None = None  # registered by the first scrape that finds the model on CUDA

    def observe_device_memory(self, device: torch.device | None) -> None:
        """At scrape: the CUDA memory gauges of the model's device. Off CUDA (or before the model is
        loaded) they stay absent and CUDA is never touched, so a CPU server never initialises it."""
        if device is None or device.type != "cuda":
            return
        if self._cuda is None:
            self._cuda = CudaMemory(self.registry)
        self._cuda.update(device)
