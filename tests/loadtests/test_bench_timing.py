"""The benchmarks' round ordering: every variant goes first in some round (load swings hit all sides)."""

from __future__ import annotations

from loadtests.bench_swap.timing import rotated, rotated_mirrored


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
