"""The printed table (one row per phase, then the compare row) and the run's verdicts."""

from __future__ import annotations

import math
from typing import Any

from loadtests.bench_swap.report import Row, fmt_s, render
from loadtests.load.phases import Phase

HEADER: Row = [
    "phase", "users", "requests", "img/s", "p50", "p95", "p99",
    "429 share", "429 with Retry-After", "other errors", "RSS slope", "CUDA alloc. slope",
]  # fmt: skip
NO_CUDA = "n/a (no CUDA)"

MIN_SOAK_FOR_VERDICT_S = 120.0  # a shorter soak's slope is printed but not judged


def phase_row(phase: Phase) -> Row:
    f = phase.figures
    return [
        phase.name + (" (base)" if phase.mix == "base" else ""),
        str(phase.users),
        str(f["requests"]),
        _num(f["img_per_s"]),
        fmt_s(f["p50_s"]),
        fmt_s(f["p95_s"]),
        fmt_s(f["p99_s"]),
        f"{100 * f['share_429']:.1f} %" if f["requests"] else "n/a",
        f"{f['status_429_with_retry_after']}/{f['status_429']}" if f["status_429"] else "–",
        str(f["other_errors"]),
        _slope(phase.rss.get("slope_mib_per_min")),
        _cuda_cell(phase),
    ]


def compare_row(compare: dict[str, Any]) -> Row:
    cells = [""] * len(HEADER)
    cells[0] = f"compare zipf/base ({compare['rounds']} round{'s' * (compare['rounds'] != 1)})"
    cells[1] = str(compare["users"])
    cells[3] = f"{_num(compare['img_per_s_ratio'])}×"
    cells[6] = f"{_num(compare['p99_ratio'])}×"
    return cells


def table(phases: list[Phase], compare: dict[str, Any]) -> str:
    rows = [HEADER, *(phase_row(p) for p in phases)]
    if compare:
        rows.append(compare_row(compare))
    return render(rows)


def verdicts(
    phases: list[Phase], post: dict[str, Any], rss_bound: float, cuda_bound: float
) -> dict[str, Any]:
    """What the run must show: no error but 429s, every 429 with Retry-After, a flat RSS (and, on CUDA,
    flat allocated CUDA memory), a live server."""
    refused = sum(p.figures["status_429"] for p in phases)
    with_header = sum(p.figures["status_429_with_retry_after"] for p in phases)
    soak = next((p for p in phases if p.name == "soak"), None)
    slope = soak.rss.get("slope_mib_per_min", math.nan) if soak else math.nan
    cuda = soak is not None and bool(soak.cuda)
    cuda_slope = soak.cuda.get("slope_mib_per_min", math.nan) if soak else math.nan
    judged = soak is not None and soak.ended - soak.started >= MIN_SOAK_FOR_VERDICT_S
    out = {
        "other_errors": sum(p.figures["other_errors"] for p in phases),
        "status_429": refused,
        "status_429_with_retry_after": with_header,
        "every_429_has_retry_after": with_header == refused,
        "rss_slope_mib_per_min": slope,
        "rss_bound_mib_per_min": rss_bound,
        "rss_within_bound": _within(slope, rss_bound, judged),
        "cuda": cuda,
        "cuda_slope_mib_per_min": cuda_slope,
        "cuda_bound_mib_per_min": cuda_bound,
        "cuda_within_bound": _within(cuda_slope, cuda_bound, judged),
        "post_check_ok": bool(
            post.get("alive") and post.get("request_status") == 200 and post.get("drained_s") is not None
        ),
        "server_internal_errors": post.get("errors_by_type", {}).get("internal_error", 0),
    }
    out["passed"] = (
        out["other_errors"] == 0
        and out["every_429_has_retry_after"]
        and out["rss_within_bound"] is not False
        and out["cuda_within_bound"] is not False
        and out["post_check_ok"]
        and out["server_internal_errors"] == 0
    )
    return out


def _within(slope: float, bound: float, judged: bool) -> bool | None:
    """Whether a soak's memory slope is within its bound; ``None`` when not judged or not measured."""
    return (slope <= bound) if judged and not math.isnan(slope) else None


def verdict_lines(v: dict[str, Any]) -> list[str]:
    return [
        f"other errors (not 200, not 429): {v['other_errors']} (must be 0)",
        f"429s: {v['status_429']}, with Retry-After: {v['status_429_with_retry_after']}",
        _slope_line("RSS", v["rss_slope_mib_per_min"], v["rss_bound_mib_per_min"], v["rss_within_bound"]),
        _slope_line(
            "CUDA allocated memory",
            v["cuda_slope_mib_per_min"],
            v["cuda_bound_mib_per_min"],
            v["cuda_within_bound"],
        )
        if v["cuda"]
        else f"CUDA allocated memory slope: {NO_CUDA}",
        f"post-check (drained, one more request succeeds, server alive): "
        f"{'ok' if v['post_check_ok'] else 'FAILED'}; internal_error count {v['server_internal_errors']}",
        "PASSED" if v["passed"] else "FAILED",
    ]


def _slope_line(what: str, slope: float, bound: float, within: bool | None) -> str:
    judged = "not judged (soak under 2 min)" if within is None else ("within" if within else "OVER")
    return f"{what} slope over the soak's second half: {slope:+.2f} MiB/min, bound {bound} MiB/min: {judged}"


def _cuda_cell(phase: Phase) -> str:
    """The soak's allocated-CUDA-memory slope; only the soak samples it."""
    if phase.name != "soak":
        return ""
    return _slope(phase.cuda.get("slope_mib_per_min")) if phase.cuda else NO_CUDA


def _slope(value: float | None) -> str:
    return f"{value:+.2f} MiB/min" if value is not None and not math.isnan(value) else ""


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"
