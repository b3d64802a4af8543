"""One scrape target for the fleet: every replica's ``/metrics`` text, each sample labelled ``replica``.

Replicas push their exposition (read through their own app's ``GET /metrics``) to ``MetricsHub`` every
``metrics_push_s``; the ingress answers ``GET /metrics`` with ``merge`` of what the hub holds, so a
sample is at most ``metrics_push_s`` old. A replica that stops is forgotten at once; one that stopped
pushing (killed) after ``stale_after_s``. No Ray import here: the hub is a plain class that
``service.ray.app`` deploys.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge(expositions: Mapping[str, str], label: str = REPLICA_LABEL) -> bytes:
    """The samples of every exposition, with ``label=<its key>`` added; one family per metric name."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labels = {**sample.labels, label: replica}
                merged.samples.append(
                    Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
                )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)


class MetricsHub:
    """The latest exposition of each replica (a one-replica Serve deployment)."""

    def __init__(self, stale_after_s: float = 60.0) -> None:
        self.stale_after_s = stale_after_s
        self._texts: dict[str, tuple[str, float]] = {}

    def push(self, replica: str, text: str) -> None:
        self._texts[replica] = (text, time.monotonic())

    def forget(self, replica: str) -> None:
        self._texts.pop(replica, None)

    def snapshot(self) -> dict[str, str]:
        now = time.monotonic()
        for replica in [r for r, (_, at) in self._texts.items() if now - at > self.stale_after_s]:
            del self._texts[replica]
        return {replica: text for replica, (text, _) in self._texts.items()}
