"""The traffic mix: which adapter (or none) each request names — Zipf over the adapters plus a base share.

Pure Python (the locust process imports it, and must stay light). Adapter ``k`` (1-based rank) is drawn
with probability ``(1 - base_share) · k^-s / H(n, s)`` where ``H(n, s) = Σ_{j=1..n} j^-s``; a request
names no adapter with probability ``base_share``. With ``s = 1.1`` and 50 adapters the most popular one
gets 26 % of the adapter traffic, the top 12 (what the suite's device cache tier holds) 73 % and the
least popular 0.35 %: a few hot adapters stay resident while the long tail keeps the cache evicting and
reloading.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf(s) probabilities of ranks 1…n."""
    if n < 1:
        raise ValueError("a Zipf mix needs at least one item")
    if s < 0:
        raise ValueError("the Zipf exponent must be ≥ 0")
    raw = [k**-s for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ZipfMix:
    """Draws ``None`` (the base model alone) or one of ``ids``, the first being the most popular."""

    def __init__(self, ids: Sequence[str], s: float, base_share: float, seed: int | None = None) -> None:
        if not 0.0 <= base_share <= 1.0:
            raise ValueError("base_share must be within 0..1")
        if not ids and base_share < 1.0:
            raise ValueError("with no adapters every request is a base request: base_share must be 1")
        self.ids = list(ids)
        self.base_share = base_share
        self.probabilities = [(1.0 - base_share) * w for w in zipf_weights(len(ids), s)] if ids else []
        self._cumulative = list(itertools.accumulate(self.probabilities))
        self._rng = random.Random(seed)

    def sample(self) -> str | None:
        u = self._rng.random()
        if u < self.base_share or not self.ids:
            return None
        index = bisect.bisect_right(self._cumulative, u - self.base_share)
        return self.ids[min(index, len(self.ids) - 1)]  # u → 1 may round past the last sum
