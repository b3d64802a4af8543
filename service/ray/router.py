"""``AffinityRequestRouter``: ``routing.AffinityPolicy`` as a Ray Serve request router.

Configured on the replica deployment (``RequestRouterConfig(request_router_class=...)``); every handle
to it routes with this class. The request's key is its multiplexed model id; what each replica holds
is the ``held`` list its ``record_routing_stats`` last reported (our cache, not Ray's multiplex LRU).
Ray then probes queue lengths within each rank and takes the shortest one that accepts.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from service.ray.routing import AffinityPolicy, RandomPolicy, ReplicaView


def replica_view(replica: RunningReplica) -> ReplicaView:
    stats = replica.routing_stats or {}
    held = stats.get("held", ())
    return ReplicaView(replica.replica_id.unique_id, frozenset(str(h) for h in held))


class AffinityRequestRouter(RequestRouter):
    """Ranks replicas with ``AffinityPolicy`` (``policy="random"``: the no-affinity baseline)."""

    def initialize_state(self, **kwargs: Any) -> None:
        spill = int(kwargs.get("spill", 2))
        self._policy: AffinityPolicy | RandomPolicy = (
            RandomPolicy() if kwargs.get("policy") == "random" else AffinityPolicy(spill=spill)
        )
        self._rng = random.Random()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = None
        if pending_request is not None:
            key = pending_request.metadata.multiplexed_model_id or None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = self._policy.rank(key, [replica_view(r) for r in candidate_replicas], self._rng)
        return [[by_id[rid] for rid in rank] for rank in ranks]
