"""Adapter-affinity routing: the key of a request, and the policy that ranks replicas for it.

Pure Python (no Ray, no torch): ``service.ray.router`` runs ``AffinityPolicy.rank`` inside Ray Serve's
request router, and the simulator (``loadtests/ray_affinity/sim.py``) runs the very same function
against modelled replicas, with ``select`` standing in for the part Ray does itself.

The key of a request is its adapter set: the sorted, de-duplicated ``id@version`` list, joined by
commas (ids never contain a comma or ``@``); a request without adapters has no key. It travels as the
request's Ray Serve *multiplexed model id*. A replica *holds* a key when every adapter of it is in its
device tier, as its own cache reports (``record_routing_stats``: the cache is the source of truth).

The ranks, tried in order (Ray takes the replica with the shortest queue among those of a rank that
accept another request, i.e. have fewer than ``max_ongoing_requests`` in flight, else the next rank):

1. the replicas that hold the key;
2. the key's *home*: the first replica of the key's rendezvous (highest-random-weight) order that does
   not hold it, so a cold key always lands on the same replica and the keys partition the caches;
3. the next ``spill`` replicas of that order (a hot key overflowing its home spills to the same few
   replicas, which then hold it too);
4. every other replica (never stuck while any replica has room).

No key: two random replicas (Ray's own power-of-two-choices).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SEPARATOR = ","


def adapter_set_key(versions: Iterable[tuple[str, int]]) -> str | None:
    """The stable key of an adapter set: sorted unique ``id@N``; ``None`` for no adapters."""
    parts = sorted({f"{adapter_id}@{number}" for adapter_id, number in versions})
    return SEPARATOR.join(parts) or None


def key_parts(key: str) -> frozenset[str]:
    return frozenset(part for part in key.split(SEPARATOR) if part)


def held_by(key: str, held: frozenset[str]) -> bool:
    """Whether a replica whose device tier holds ``held`` (``id@N`` strings) holds every part of ``key``."""
    return key_parts(key) <= held


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of a replica: its id and the ``id@N`` adapters its device tier reported."""

    replica_id: str
    held: frozenset[str] = frozenset()


def _weight(key: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replicas by decreasing rendezvous weight for ``key``: stable, and adding or removing one replica
    moves only the keys whose first choice it is."""
    return list(_order(key, tuple(sorted(replica_ids))))


@functools.lru_cache(maxsize=1 << 16)
def _order(key: str, replica_ids: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(replica_ids, key=lambda rid: (-_weight(key, rid), rid)))


def two_random(replica_ids: Sequence[str], rng: random.Random) -> list[str]:
    if len(replica_ids) <= 2:
        return list(replica_ids)
    return rng.sample(list(replica_ids), 2)


@dataclass(frozen=True)
class AffinityPolicy:
    spill: int = 2  # replicas after the home that a hot key overflows to, in rendezvous order

    def rank(self, key: str | None, replicas: Sequence[ReplicaView], rng: random.Random) -> list[list[str]]:
        """Replica ids in ranks of preference for a request with ``key`` (see the module docstring)."""
        ids = [r.replica_id for r in replicas]
        if not ids:
            return []
        if key is None:
            return [two_random(ids, rng)]
        parts = key_parts(key)
        holders = [r.replica_id for r in replicas if parts <= r.held]
        held = set(holders)
        others = [rid for rid in rendezvous_order(key, ids) if rid not in held]
        ranks = [holders, others[:1], others[1 : 1 + self.spill], others[1 + self.spill :]]
        return [rank for rank in ranks if rank]


@dataclass(frozen=True)
class RandomPolicy:
    """The baseline: no affinity, two random replicas per request (what Ray does without a key)."""

    def rank(self, key: str | None, replicas: Sequence[ReplicaView], rng: random.Random) -> list[list[str]]:
        return [two_random([r.replica_id for r in replicas], rng)] if replicas else []


def select(ranks: Sequence[Sequence[str]], ongoing: Mapping[str, int], max_ongoing: int) -> str | None:
    """A model of Ray Serve's choice within the ranks (``RequestRouter._select_from_candidate_replicas``
    over ``choose_replicas``' lists in order): the first rank with a replica below ``max_ongoing``
    requests gives the one with the fewest; ``None`` when every replica is full (Ray then backs off and
    asks again)."""
    for rank in ranks:
        open_ = [rid for rid in rank if ongoing.get(rid, 0) < max_ongoing]
        if open_:
            return min(open_, key=lambda rid: ongoing.get(rid, 0))
    return None
