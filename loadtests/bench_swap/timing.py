"""How every phase measures: one timed call, repeats after a warm-up, alternating rounds, medians, ratios.

Two patterns cover the timing loops of all phases:

* ``repeat`` / ``time_repeats``: call ``f(i)`` for the warm-up and then ``repeats`` more times and keep
  only the samples after the warm-up (``i`` counts the warm-up calls too, so a measurement that cycles
  through files starts its cycle at the warm-up).
* ``rounds``: several variants (ours and a baseline, or one per resident count) measured back to back,
  round after round, in an order that changes from round to round (``rotated``); ``paired`` then takes
  the median of the per-round ratios, so a load swing on a shared machine hits both sides of a ratio
  alike.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeAlias, TypeVar

import torch

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

Measure: TypeAlias = Callable[[], float]  # one sample, in seconds
Variant: TypeAlias = tuple[K, Measure]  # a labelled measurement taken once per round
Order: TypeAlias = Callable[[int, Sequence[Variant[K]]], Sequence[Variant[K]]]


# -- one measurement ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_result(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()``'s result and wall time; a garbage collection first, so no earlier garbage is charged to
    it, and the device synchronised on both sides."""
    gc.collect()
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


@dataclass(frozen=True)
class Clocks:
    """Where the seconds of one call went: ``wall``; ``cpu``, the process's CPU time (user + system, every
    thread: ``time.process_time``); ``queued``, the time its threads were runnable but waited for a
    core (Linux ``/proc/self/task/*/schedstat``; NaN elsewhere). On a shared machine the wall time
    counts the time other processes held the cores; the CPU time does not (it still counts page faults
    and waits on shared memory bandwidth), and ``queued`` says how much of the difference that was."""

    wall: float
    cpu: float
    queued: float


def queued_s() -> float:
    """Seconds this process's live threads have waited on a run queue so far (NaN off Linux)."""
    total = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            with suppress(FileNotFoundError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return total / 1e9


def clocked_result(fn: Callable[[], T], device: torch.device) -> tuple[T, Clocks]:
    """``timed_result`` with the CPU and run-queue seconds of the call (``Clocks``)."""
    gc.collect()
    sync(device)
    queued, cpu, started = queued_s(), time.process_time(), time.perf_counter()
    result = fn()
    sync(device)
    wall = time.perf_counter() - started
    return result, Clocks(wall, time.process_time() - cpu, queued_s() - queued)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``fn()`` (see ``timed_result``)."""
    return timed_result(fn, device)[1]


def stopwatch(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and bare wall time: no collection, no device sync (CPU-side steps in a row)."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


# -- repeats and rounds -------------------------------------------------------------------------------


def repeat(measure: Callable[[int], T], repeats: int, warmup: int = 0) -> list[T]:
    """``measure(i)`` for ``i`` in ``0 … warmup + repeats - 1``; the first ``warmup`` results dropped."""
    return [measure(i) for i in range(warmup + repeats)][warmup:]


def time_repeats(fn: Callable[[int], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall times (``timed``) of ``fn(i)``, ``repeats`` samples after ``warmup`` discarded calls."""
    return repeat(lambda i: timed(partial(fn, i), device), repeats, warmup)


def fixed(_round: int, items: Sequence[T]) -> list[T]:
    """The same order every round."""
    return list(items)


def rotated(round_: int, items: Sequence[T]) -> list[T]:
    """Round ``r`` starts with item ``r mod n`` (for two items: A B, B A, A B, …)."""
    shift = round_ % len(items)
    return [*items[shift:], *items[:shift]]


def rotated_mirrored(round_: int, items: Sequence[T]) -> list[T]:
    """``rotated``, read backwards on odd rounds, so that with three or more items each one follows
    each other one in some round. Two items just alternate (mirroring a rotation of two would undo it
    and put the same item first in every round)."""
    order = rotated(round_, items)
    if len(items) <= 2:
        return order
    return order if round_ % 2 == 0 else order[::-1]


def rounds(
    variants: Sequence[Variant[K]],
    count: int,
    order: Order[K] = rotated,
    *,
    warmup: int = 0,
    after_round: Callable[[int, dict[K, list[float]]], None] | None = None,
) -> dict[K, list[float]]:
    """``count`` rounds, each measuring every variant once in ``order(round, variants)``.

    ``warmup`` rounds first run every variant in the listed order and are not kept. ``after_round``
    sees the samples so far (for a progress line). Returns the samples per variant label.
    """
    for _ in range(warmup):
        for _label, measure in variants:
            measure()
    samples: dict[K, list[float]] = {label: [] for label, _ in variants}
    for round_ in range(count):
        for label, measure in order(round_, variants):
            samples[label].append(measure())
        if after_round is not None:
            after_round(round_, samples)
    return samples


# -- summaries ----------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def medians(samples: Mapping[K, Sequence[float]]) -> dict[K, float]:
    return {label: median(values) for label, values in samples.items()}


def paired(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of per-round ratios: measurements taken back to back share the machine's load."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


def flatness(values: Sequence[float]) -> float:
    return max(values) / min(values)


def columns(rows: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, list[float]]:
    """Per-key sample lists from per-round rows."""
    return {key: [row[key] for row in rows] for key in keys}
