"""The measured run: a loopback Ray cluster, 4 tiny-sd replicas, 1,000 registered adapters, a Zipf stream.

Both arms run on the same Ray cluster, one after the other, each a fresh deployment of the app (cold
caches): ``routing=affinity`` (``AffinityRequestRouter`` with ``AffinityPolicy``) and
``routing=random`` (the same router with ``RandomPolicy``, i.e. Ray's power-of-two choices without a
key). The hit rate is the replicas' own count, ``loraswap_routing_requests_total{held}``, over the
measured requests (after ``warmup``); the device tier's hit/miss counters are reported beside it.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.ray_affinity.sim import adapter_key, percentile, zipf_cdf

RANK = 3  # 129,024 device bytes per tiny-sd adapter (fp32): 16 fit in a 2 MiB device tier
DEVICE_MB = 2
HOST_MB = 1


@dataclass(frozen=True)
class RunConfig:
    replicas: int = 4
    adapters: int = 1000
    zipf_s: float = 1.1
    requests: int = 1200
    warmup: int = 300
    concurrency: int = 8
    max_ongoing: int = 4
    seed: int = 0


def log(message: str) -> None:
    print(f"[ray_affinity {time.strftime('%H:%M:%S')}] {message}", flush=True)


def register_adapters(home: Path, count: int) -> list[str]:
    """``count`` rank-3 tiny-sd adapters in the fleet's (shared, local) store, registered directly."""
    import torch
    from diffusers import UNet2DConditionModel

    from adapters.identity import BaseIdentity
    from adapters.registry import Registry
    from adapters.sources.local import LocalStore
    from basemodel.tiny import TINY_NAME, ensure_tiny
    from loadtests.bench_swap.fixtures import peft_layout, write_adapter_files

    models = home / "models"
    done = home / f"registered-{count}"
    ids = [f"z-{index:06d}" for index in range(count)]
    if done.is_file():  # a rerun over the same --workdir
        return ids
    ensure_tiny(models)
    config = UNet2DConditionModel.load_config(str(models / TINY_NAME / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    files = write_adapter_files(peft_layout(unet, RANK), count, torch.float16, home / "files")
    registry = Registry(LocalStore(home / "adapters"), BaseIdentity.from_spec(TINY_NAME, models))
    for adapter_id, path in zip(ids, files, strict=True):
        registry.register(path, adapter_id)
    done.touch()
    return ids


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "replica")
            name = f"{sample.name}{{{labels}}}"
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def stream(cfg: RunConfig) -> list[str]:
    """The request stream: adapter ids drawn from Zipf(s), seeded (the simulator draws the same way)."""
    import bisect
    import random

    rng = random.Random(cfg.seed)
    cdf = zipf_cdf(cfg.adapters, cfg.zipf_s)
    return [f"z-{bisect.bisect_left(cdf, rng.random()):06d}" for _ in range(cfg.warmup + cfg.requests)]


Recorder = Callable[[float, dict[str, Any]], None]


def drive(url: str, ids: list[str], concurrency: int, record: Recorder) -> None:
    """``concurrency`` closed-loop clients working through ``ids`` in order."""
    lock = threading.Lock()
    position = iter(range(len(ids)))
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    index = next(position, None)
                if index is None:
                    return
                body = {"prompt": "a photo", "steps": 1, "width": 32, "height": 32, "seed": index}
                body["adapters"] = [{"id": ids[index], "version": 1}]
                started = time.perf_counter()
                response = http.post("/v1/generate", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                    continue
                record(elapsed, response.json()["timings"])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")


def run_arm(url: str, home: Path, routing: str, cfg: RunConfig, requests: list[str]) -> dict[str, Any]:
    from ray import serve

    from service.ray.app import APP_NAME, build_app

    args = {
        "replicas": cfg.replicas,
        "home": str(home),
        "base_model": "tiny-sd",
        "device": "cpu",
        "routing": routing,
        "max_ongoing_requests": cfg.max_ongoing,
        "replica_cpus": 1,
        "routing_stats_period_s": 0.5,
        "metrics_push_s": 0.5,
        "adapter_cache_device_mb": DEVICE_MB,
        "adapter_cache_host_mb": HOST_MB,
        "max_queue": 64,
    }
    log(f"deploying {cfg.replicas} replicas, routing={routing}")
    started = time.monotonic()
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    log(f"ready after {time.monotonic() - started:.0f} s; warm-up {cfg.warmup} requests")
    drive(url, requests[: cfg.warmup], cfg.concurrency, lambda *_: None)
    time.sleep(1.5)  # the replicas' metric pushes (0.5 s) catch up
    before = scrape(url)
    latencies: list[float] = []
    loads: list[float] = []
    gens: list[float] = []

    def record(elapsed: float, timings: dict[str, Any]) -> None:
        latencies.append(elapsed)
        load = float(timings.get("adapter_load_s", 0.0))
        gens.append(float(timings.get("total_s", 0.0)) - load - float(timings.get("queue_s", 0.0)))
        if load:
            loads.append(load)

    log(f"measuring {cfg.requests} requests at concurrency {cfg.concurrency}")
    started = time.monotonic()
    drive(url, requests[cfg.warmup :], cfg.concurrency, record)
    wall = time.monotonic() - started
    time.sleep(1.5)
    after = scrape(url)
    serve.delete(APP_NAME)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    held = delta("loraswap_routing_requests_total{held=true}")
    missed = delta("loraswap_routing_requests_total{held=false}")
    device_hits = delta("loraswap_adapter_cache_hits_total{tier=device}")
    device_misses = delta("loraswap_adapter_cache_misses_total{tier=device}")
    result = {
        "routing": routing,
        "requests": len(latencies),
        "hit_rate": held / (held + missed) if held + missed else 0.0,
        "device_tier_hit_rate": device_hits / (device_hits + device_misses) if device_hits else 0.0,
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "mean_s": statistics.fmean(latencies),
        "throughput_rps": len(latencies) / wall,
        "generate_s_median": statistics.median(gens) if gens else 0.0,
        "adapter_load_s_median": statistics.median(loads) if loads else 0.0,
        "routed_held": held,
        "routed_not_held": missed,
    }
    summary = f"hit rate {result['hit_rate']:.3f}, p50 {result['p50_s']:.3f} s, p99 {result['p99_s']:.3f} s"
    log(f"{routing}: {summary}")
    return result


def measure(cfg: RunConfig, workdir: Path) -> dict[str, Any]:
    from ray import serve

    from service.ray.cluster import free_port, start_ray

    home = workdir / "home"
    log(f"registering {cfg.adapters} rank-{RANK} adapters")
    started = time.monotonic()
    register_adapters(home, cfg.adapters)
    registered_s = time.monotonic() - started
    requests = stream(cfg)
    assert [adapter_key(int(i.split("-")[1])) for i in requests[:3]] == [f"{i}@1" for i in requests[:3]]
    start_ray(num_cpus=cfg.replicas + 2)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        arms = {routing: run_arm(url, home, routing, cfg, requests) for routing in ("affinity", "random")}
    finally:
        serve.shutdown()
    digest = hashlib.sha256(",".join(requests).encode()).hexdigest()[:16]
    return {"arms": arms, "register_s": registered_s, "stream_sha256_16": digest}
