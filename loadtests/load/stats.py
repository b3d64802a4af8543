"""Figures from the locust records and the memory samples: throughput, latency percentiles, 429s, slopes.

Pure Python (no torch, no locust): the harness and the tests import it, and the locustfile uses
``valid_retry_after`` so that the user and the report judge a 429 the same way.

A record is one response as the locustfile wrote it: ``t`` (wall-clock start), ``latency_s``,
``status`` (0 for a connection error), ``retry_after`` (the header, or null), ``adapter`` and
``error`` (why the response is wrong, or null).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

MIB_PER_KIB = 1 / 1024


def valid_retry_after(header: str | None) -> bool:
    """A ``Retry-After`` in the delta-seconds form (RFC 9110: a non-negative integer)."""
    return header is not None and header.strip().isdigit()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of the least-squares line through ``(xs, ys)``; NaN with fewer than two distinct xs."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    n = len(xs)
    if n < 2:
        return math.nan
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx


def slope_mib_per_min(
    samples: Sequence[tuple[float, float]], start: float, end: float, name: str
) -> dict[str, Any]:
    """A memory figure's trend over the second half of ``[start, end]`` (the first half is warm-up).

    ``samples`` are ``(wall time, KiB)`` of the figure ``name`` (``rss``, ``cuda_allocated``). Returns
    the slope (MiB/min, least squares), the number of samples it used and the figure (MiB) at the first
    and last of them and at the peak of the whole window, as ``{name}_first_mib`` and so on.
    """
    middle = start + (end - start) / 2
    used = [(t, kib) for t, kib in samples if middle <= t <= end]
    whole = [kib for t, kib in samples if start <= t <= end]
    slope = least_squares_slope([t / 60 for t, _ in used], [kib * MIB_PER_KIB for _, kib in used])
    return {
        "slope_mib_per_min": slope,
        "samples": len(used),
        "window_s": end - middle,
        f"{name}_first_mib": used[0][1] * MIB_PER_KIB if used else math.nan,
        f"{name}_last_mib": used[-1][1] * MIB_PER_KIB if used else math.nan,
        f"{name}_peak_mib": max(whole) * MIB_PER_KIB if whole else math.nan,
    }


def summarise(records: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """One phase's figures. Throughput and latency are taken over the steady window, from ``warmup_s``
    after the first request started to the last response (responses finished earlier are left out);
    the counts — requests, 429s, Retry-After, other errors, statuses — over every response.

    A phase that recorded no response has every figure too: zero counts, NaN rates and latencies.
    """
    if records:
        window_start = min(r["t"] for r in records) + warmup_s
        window_end = max(r["t"] + r["latency_s"] for r in records)
        window = max(window_end - window_start, 1e-9)
    else:
        window_start, window = 0.0, 0.0
    ok = [r for r in records if outcome(r) == "ok" and r["t"] + r["latency_s"] >= window_start]
    refused = [r for r in records if outcome(r) == "429"]
    return {
        "requests": len(records),
        "successes": len(ok),
        "window_s": window,
        "img_per_s": len(ok) / window if window else math.nan,
        **_latency([r["latency_s"] for r in ok]),
        "status_429": len(refused),
        "share_429": len(refused) / len(records) if records else math.nan,
        "status_429_with_retry_after": sum(valid_retry_after(r["retry_after"]) for r in refused),
        "retry_after_values": dict(Counter(str(r["retry_after"]) for r in refused)),
        "other_errors": sum(outcome(r) == "error" for r in records),
        "statuses": dict(Counter(str(r["status"]) for r in records)),
        "error_examples": sorted({str(r["error"]) for r in records if r["error"]})[:5],
    }


def outcome(record: dict[str, Any]) -> str:
    """``ok`` (a correct 200), ``429`` (refused, with or without a valid Retry-After) or ``error``."""
    if record["status"] == 429:
        return "429"
    return "ok" if record["status"] == 200 and record["error"] is None else "error"


def _latency(latencies: Sequence[float]) -> dict[str, float]:
    return {f"p{q}_s": percentile(latencies, q) for q in (50, 95, 99)}


def saturation_users(ramp: Sequence[tuple[int, float, int]], fraction: float = 0.9) -> int:
    """The saturating users of a ramp of ``(users, throughput, 429s)`` steps: the fewest users whose
    throughput reaches ``fraction`` of the best step — or, if fewer, the first step that got 429s (the
    queue was full, so the server was past saturation there, whatever a noisy machine made of its
    throughput)."""
    measured = [(users, rate, refused) for users, rate, refused in ramp if not math.isnan(rate)]
    if not measured:
        raise ValueError("no ramp step produced a throughput")
    best = max(rate for _, rate, _ in measured)
    candidates = [users for users, rate, _ in measured if rate >= fraction * best]
    candidates += [users for users, _, refused in measured if refused > 0][:1]
    return min(candidates)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan
