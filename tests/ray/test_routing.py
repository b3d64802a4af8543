"""The routing policy and the simulator that runs it (no Ray, no torch)."""

from __future__ import annotations

import random
from dataclasses import replace

from loadtests.ray_affinity.sim import SimConfig, simulate, top_mass
from service.ray.routing import (
    AffinityPolicy,
    RandomPolicy,
    ReplicaView,
    adapter_set_key,
    held_by,
    rendezvous_order,
    select,
)

IDS = ["r0", "r1", "r2", "r3"]


def test_the_key_is_the_sorted_adapter_set() -> None:
    assert adapter_set_key([("b", 2), ("a", 10), ("b", 2)]) == "a@10,b@2"
    assert adapter_set_key([]) is None
    assert held_by("a@1,b@2", frozenset({"a@1", "b@2", "c@1"}))
    assert not held_by("a@1,b@2", frozenset({"a@1", "b@1"}))


def test_holders_first_then_the_keys_home_then_spill() -> None:
    policy = AffinityPolicy(spill=2)
    rng = random.Random(0)
    views = [ReplicaView(rid) for rid in IDS]
    order = rendezvous_order("x@1", IDS)
    assert policy.rank("x@1", views, rng) == [order[:1], order[1:3], order[3:]]
    held = [ReplicaView(rid, frozenset({"x@1"}) if rid == order[2] else frozenset()) for rid in IDS]
    ranks = policy.rank("x@1", held, rng)
    assert ranks[0] == [order[2]] and ranks[1] == [order[0]]
    assert sorted(rid for rank in ranks for rid in rank) == IDS  # every replica is reachable
    assert len(RandomPolicy().rank("x@1", views, rng)[0]) == 2
    assert len(policy.rank(None, views, rng)[0]) == 2


def test_a_full_holder_overflows_to_the_next_rank() -> None:
    ranks = [["r1"], ["r2"], ["r0", "r3"]]
    assert select(ranks, {"r1": 0}, 4) == "r1"
    assert select(ranks, {"r1": 4, "r2": 1}, 4) == "r2"
    assert select(ranks, {"r1": 4, "r2": 4, "r0": 3, "r3": 1}, 4) == "r3"
    assert select(ranks, dict.fromkeys(IDS, 4), 4) is None


def test_rendezvous_moves_only_the_removed_replicas_keys() -> None:
    keys = [f"k{i}@1" for i in range(400)]
    before = {k: rendezvous_order(k, IDS)[0] for k in keys}
    after = {k: rendezvous_order(k, IDS[:3])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "r3" for k in moved)
    assert 60 < len(moved) < 140  # about a quarter


def test_simulated_affinity_beats_random_and_stays_under_the_bound() -> None:
    base = SimConfig(requests=1500, warmup=500)
    affinity = simulate(base)
    random_ = simulate(replace(base, policy="random"))
    bound = top_mass(base.adapters, base.zipf_s, base.replicas * base.capacity)
    assert random_.hit_rate + 0.1 < affinity.hit_rate <= bound
    assert affinity.measured == random_.measured == 1500
    # with every adapter fitting in each replica, both reach (nearly) every request held
    roomy = replace(base, adapters=12)
    assert simulate(roomy).hit_rate > 0.99 and simulate(replace(roomy, policy="random")).hit_rate > 0.95


def test_the_simulation_is_deterministic() -> None:
    cfg = SimConfig(requests=300, warmup=100)
    assert simulate(cfg) == simulate(cfg)
