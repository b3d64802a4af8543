"""A discrete-event model of the Ray Serve fleet, running the fleet's own routing code (no Ray, no torch).

Modelled: ``replicas`` replicas, each a device tier holding ``capacity`` adapters (LRU, filled when a
request arrives: the server leases and loads before queueing) and one worker serving its FIFO queue
(``gen_s`` per request, plus ``load_s`` when the adapter was not resident); ``concurrency`` closed-loop
clients drawing adapters from Zipf(``zipf_s``) over ``adapters``; the router seeing each replica's
resident set as last reported (refreshed every ``stats_period_s``, as ``record_routing_stats`` is) and
its exact in-flight count (Ray probes queue lengths).

Shared with the fleet, not re-implemented: ``AffinityPolicy.rank`` / ``RandomPolicy.rank`` (what
``AffinityRequestRouter`` runs) and the keys (``adapter_set_key``). ``routing.select`` models Ray's own
part: the shortest queue below ``max_ongoing`` within the first rank that has one.

Not modelled: Ray's routing latency and back-off, leases pinning entries beyond the budget, the host
and disk tiers (a miss costs ``load_s`` whatever it reads from), batching (batch size 1 on CPU).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from service.ray.routing import AffinityPolicy, RandomPolicy, ReplicaView, adapter_set_key, select


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 4
    adapters: int = 1000
    capacity: int = 16
    zipf_s: float = 1.1
    policy: str = "affinity"
    requests: int = 1200
    warmup: int = 300
    concurrency: int = 8
    max_ongoing: int = 4
    spill: int = 2
    gen_s: float = 0.1
    load_s: float = 0.02
    stats_period_s: float = 0.5
    seed: int = 0


@dataclass
class SimResult:
    config: dict[str, Any]
    hit_rate: float
    p50_s: float
    p99_s: float
    measured: int
    per_replica: list[int] = field(default_factory=list)


def zipf_cdf(n: int, s: float) -> list[float]:
    weights = [(k + 1) ** -s for k in range(n)]
    total = sum(weights)
    return list(itertools.accumulate(w / total for w in weights))


def top_mass(n: int, s: float, k: int) -> float:
    """The share of requests for the ``k`` most popular adapters: no routing's hit rate can pass it
    when the fleet's device tiers hold ``k`` adapters in all."""
    cdf = zipf_cdf(n, s)
    return cdf[min(k, n) - 1]


def adapter_key(index: int) -> str:
    return adapter_set_key([(f"z-{index:06d}", 1)]) or ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(cfg: SimConfig) -> SimResult:
    rng = random.Random(cfg.seed)
    route_rng = random.Random(cfg.seed + 1)
    cdf = zipf_cdf(cfg.adapters, cfg.zipf_s)
    policy = AffinityPolicy(spill=cfg.spill) if cfg.policy == "affinity" else RandomPolicy()
    ids = [f"r{i}" for i in range(cfg.replicas)]
    caches: dict[str, OrderedDict[str, None]] = {rid: OrderedDict() for rid in ids}
    views = [ReplicaView(rid) for rid in ids]  # what the router last heard (record_routing_stats)
    ongoing = dict.fromkeys(ids, 0)
    free_at = dict.fromkeys(ids, 0.0)
    served = dict.fromkeys(ids, 0)
    events: list[tuple[float, int, str, Any]] = []  # (time, seq, kind, payload)
    seq = itertools.count()
    pending: list[tuple[float, str, int]] = []  # requests no replica could take yet
    issued = 0
    hits = 0
    measured = 0
    latencies: list[float] = []
    next_report = cfg.stats_period_s

    def draw() -> str:
        return adapter_key(bisect.bisect_left(cdf, rng.random()))

    def dispatch(now: float, key: str, number: int) -> bool:
        nonlocal hits, measured
        chosen = select(policy.rank(key, views, route_rng), ongoing, cfg.max_ongoing)
        if chosen is None:
            return False
        cache = caches[chosen]
        hit = key in cache
        if hit:
            cache.move_to_end(key)
        else:
            cache[key] = None
            while len(cache) > cfg.capacity:
                cache.popitem(last=False)
        ongoing[chosen] += 1
        start = max(now, free_at[chosen])
        free_at[chosen] = start + cfg.gen_s + (0.0 if hit else cfg.load_s)
        heapq.heappush(events, (free_at[chosen], next(seq), "done", (chosen, number, hit, arrival[number])))
        return True

    arrival: dict[int, float] = {}

    def issue(now: float) -> None:
        nonlocal issued
        if issued >= cfg.warmup + cfg.requests:
            return
        number = issued
        issued += 1
        arrival[number] = now
        key = draw()
        if not dispatch(now, key, number):
            pending.append((now, key, number))

    for _ in range(cfg.concurrency):
        issue(0.0)
    while events:
        now, _, _kind, payload = heapq.heappop(events)
        while next_report <= now:  # routing stats as of the last period boundary
            views = [ReplicaView(rid, frozenset(caches[rid])) for rid in ids]
            next_report += cfg.stats_period_s
        replica, number, hit, started = payload
        ongoing[replica] -= 1
        if number >= cfg.warmup:
            measured += 1
            hits += hit
            served[replica] += 1
            latencies.append(now - started)
        arrival.pop(number, None)
        while pending and dispatch(now, pending[0][1], pending[0][2]):
            pending.pop(0)
        issue(now)
    return SimResult(
        asdict(cfg),
        hits / measured if measured else 0.0,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        measured,
        [served[rid] for rid in ids],
    )
