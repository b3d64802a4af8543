"""The benchmarks' round ordering: every variant goes first in some round (load swings hit all sides)."""

from __future__ import annotations

import math

import torch

from loadtests.bench_swap.report import overhead_verdict
from loadtests.bench_swap.timing import clocked_result, rotated, rotated_mirrored


def test_two_variants_alternate() -> None:
    assert [rotated_mirrored(r, ["base", "adapter"])[0] for r in range(4)] == [
        "base", "adapter", "base", "adapter",
    ]  # fmt: skip


def test_three_variants_each_lead_and_each_order_pair_occurs() -> None:
    items = ["base", "adapter", "no_hooks"]
    orders = [rotated_mirrored(r, items) for r in range(6)]
    assert {o[0] for o in orders} == set(items)
    pairs = {(o[i], o[i + 1]) for o in orders for i in range(2)}
    assert all((a, b) in pairs for a in items for b in items if a != b)
    assert rotated(1, items) == ["adapter", "no_hooks", "base"]


def test_an_adapter_request_faster_than_its_base_request_is_flagged_as_noise() -> None:
    # the Flux fused row once read 0.644× (two rounds of wall time on a shared machine): not a result
    assert overhead_verdict(0.644, 1.05) == "noise (faster than base)"
    assert overhead_verdict(1.008, 1.05) == "met" and overhead_verdict(1.2, 1.05) == "NOT met"


def test_clocks_split_wall_time_into_cpu_and_run_queue_wait() -> None:
    _, clocks = clocked_result(lambda: sum(range(200_000)), torch.device("cpu"))
    assert 0 < clocks.cpu <= clocks.wall * 1.05 + 0.01  # one thread: no more CPU than wall time
    assert clocks.queued >= 0 or math.isnan(clocks.queued)  # NaN off Linux
