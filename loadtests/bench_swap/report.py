"""The printed table: one block of rows per phase, each measure against its target, and the formatting."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .config import MIB

Row = list[str]  # measure, ours, baseline, ratio, target, verdict
Results = dict[str, Any]  # one phase's results, as in the JSON

HEADER: Row = ["measure", "ours", "baseline", "ratio", "target", "verdict"]

TARGETS = {
    "cold_vs_load_unload": 20.0,  # ours ≥20× faster than load_lora_weights + unload_lora_weights
    "cold_vs_read": 2.0,  # ours ≤2× the time to read the file (issue 21)
    "switch_vs_set_adapters": 50.0,  # ours ≥50× faster than set_adapters
    "switch_flat": 1.5,  # ours: slowest / fastest over the resident counts ≤1.5 ("flat")
    "request_overhead": 1.10,  # adapter request ≤1.10× the base request
    "request_overhead_fused": 1.05,  # on the fused path (issue 19's MMDiT rows) ≤1.05×
    "mixed_speedup": 1.5,  # mixed batch ≥1.5× sequential (a CUDA target)
    "memory_growth_pct": 2.0,  # RSS growth over the swaps ≤2 %
}


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def overhead_verdict(ratio: float, limit: float) -> str:
    """An adapter request's cost over the base request's against ``limit``; an adapter cannot make a
    request faster, so a ratio well under 1 is flagged as noise rather than reported as met."""
    if ratio < 1 / limit:
        return "noise (faster than base)"
    return verdict(ratio <= limit)


def note(text: str) -> Row:
    """A row whose text spans the table."""
    return [text] + [""] * (len(HEADER) - 1)


def table_rows(results: dict[str, Results], device: torch.device) -> list[Row]:
    """The header and the rows of every phase that finished (failed phases are left out)."""
    done = {name: out for name, out in results.items() if "error" not in out}
    blocks: list[tuple[str, Callable[[Results], list[Row]]]] = [
        ("cold_load", cold_rows),
        ("switch", switch_rows),
        ("unet_step", unet_step_rows),
        ("request", request_rows),
        ("mixed", lambda out: mixed_rows(out, on_cuda=device.type == "cuda")),
        ("memory", memory_rows),
        ("paths", _paths_rows),
        ("preload", _preload_rows),
    ]
    rows = [HEADER]
    for name, build in blocks:
        if name in done:
            rows += build(done[name])
    return rows


def render(rows: list[Row]) -> str:
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        if all(not cell for cell in row[1:]):  # a note spanning the table
            lines.append("| " + row[0] + " |" + " |" * (len(row) - 1))
            continue
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# -- one block per phase -----------------------------------------------------------------------------


def cold_rows(c: Results) -> list[Row]:
    m = c["median_s"]
    ours, theirs, read = fmt_s(m["ours_cache"]), fmt_s(m["diffusers_load_unload"]), fmt_s(m["read_bytes"])
    first = fmt_s(m["ours_first_read"])
    breakdown = ", ".join(f"{k} {fmt_s(v)}" for k, v in c["breakdown_median_s"].items())
    faster, slower = TARGETS["cold_vs_load_unload"], TARGETS["cold_vs_read"]

    def versus(label: str, value: str, baseline: str, ratio: float, *, times_read: bool) -> Row:
        if times_read:
            return [
                label,
                value,
                baseline,
                f"{ratio:.1f}× the read",
                f"≤{slower:g}× the read",
                verdict(ratio <= slower),
            ]
        return [
            label,
            value,
            baseline,
            f"{ratio:.1f}× faster",
            f"≥{faster:g}× faster",
            verdict(ratio >= faster),
        ]

    return [
        versus(
            "cold load: ours (AdapterCache, host tier empty, file verified before) vs load+unload",
            ours,
            theirs,
            c["ratio_load_unload_over_ours"],
            times_read=False,
        ),
        versus(
            "  ours (cache) vs Path.read_bytes of the file",
            ours,
            read,
            c["ratio_ours_over_read_bytes"],
            times_read=True,
        ),
        versus(
            "cold load, first read in the process (+ BLAKE3 of the file) vs load_lora_weights+unload",
            first,
            theirs,
            c["ratio_load_unload_over_first_read"],
            times_read=False,
        ),
        versus(
            "  first read vs Path.read_bytes of the file",
            first,
            read,
            c["ratio_first_read_over_read_bytes"],
            times_read=True,
        ),
        [
            "  ours (cache) vs the previous cold path (safetensors.torch.load, per-tensor checks/build)",
            ours,
            fmt_s(m["previous_path"]),
            f"{c['ratio_previous_over_ours']:.2f}× faster",
            "(info)",
            "",
        ],
        [
            "  ours (cache) vs read_bytes + safetensors.torch.load",
            ours,
            fmt_s(m["read_and_parse"]),
            f"{c['ratio_ours_over_read_and_parse']:.1f}× read+parse",
            "(info)",
            "",
        ],
        [
            "  ours (cache) vs diffusers load_lora_weights(hotswap=True)",
            ours,
            fmt_s(m["diffusers_hotswap"]),
            f"{c['ratio_hotswap_over_ours']:.1f}× faster",
            "(info)",
            "",
        ],
        note("  one-pass breakdown: " + breakdown),
    ]


def switch_rows(sw: Results) -> list[Row]:
    rows: list[Row] = []
    for row in sw["rows"]:
        rows += [
            [
                f"warm switch, {row['resident']} resident: activate vs set_adapters",
                fmt_s(row["ours_activate_s"]),
                fmt_s(row["diffusers_set_adapters_s"]),
                f"{row['ratio_set_adapters_over_activate']:.0f}× faster",
                "≥50× faster",
                verdict(row["ratio_set_adapters_over_activate"] >= TARGETS["switch_vs_set_adapters"]),
            ],
            [
                "  same, with cache acquire + release",
                fmt_s(row["ours_acquire_activate_release_s"]),
                fmt_s(row["diffusers_set_adapters_s"]),
                f"{row['ratio_set_adapters_over_acquire_path']:.0f}× faster",
                "≥50× faster",
                verdict(row["ratio_set_adapters_over_acquire_path"] >= TARGETS["switch_vs_set_adapters"]),
            ],
        ]
    span = f"{sw['rows'][0]['resident']}→{sw['rows'][-1]['resident']}"
    for label, key in (("activate", "ours_activate"), ("acquire+activate+release", "ours_acquire_path")):
        growth = sw[f"{key}_flatness"]
        rows.append(
            [
                f"switch cost {span} resident, ours {label}: slowest/fastest median (of minima)",
                f"{growth:.2f}× ({sw[f'{key}_flatness_of_minima']:.2f}×)",
                "",
                "",
                "flat (≤1.5×)",
                verdict(growth <= TARGETS["switch_flat"]),
            ]
        )
        paired_growth = sw.get(f"{key}_flatness_paired")
        if paired_growth is not None:  # older JSON files have no paired reference
            rows.append(
                [
                    "  same, paired: per-round ratio to one adapter re-entered beside it",
                    f"{paired_growth:.2f}×",
                    "",
                    "",
                    "flat (≤1.5×)",
                    verdict(paired_growth <= TARGETS["switch_flat"]),
                ]
            )
    rows.append(
        [
            f"switch cost {span} resident, diffusers set_adapters: last/first",
            "",
            f"{sw['diffusers_growth_last_over_first']:.2f}×",
            "",
            "(grows)",
            "",
        ]
    )
    return rows


def unet_step_rows(u: Results) -> list[Row]:
    m = u["median_s"]
    return [
        [
            f"UNet step, batch 2, {u['px']} px: {label} with adapter vs base",
            fmt_s(m[key]) if key == "ours" else "",
            fmt_s(m["base"]) if key == "ours" else fmt_s(m[key]),
            f"{u[f'ratio_{key}_over_base']:.3f}×",
            "(info)",
            "",
        ]
        for label, key in (("ours (hooks)", "ours"), ("diffusers (peft layers)", "diffusers"))
    ]


def request_rows(q: Results) -> list[Row]:
    m = q["median_s"]
    fused = q.get("path_policy") == "fused"
    how = f"fused path ({q['paths_taken'].get('adapter', '?')})" if fused else "CFG"
    limit = TARGETS["request_overhead_fused" if fused else "request_overhead"]
    rows = [
        [
            f"request {q['px']} px, {q['steps']} steps, {how}: adapter vs base",
            fmt_s(m["adapter"]),
            fmt_s(m["base"]),
            f"{q['ratio_adapter_over_base']:.3f}×",
            f"≤{limit:.2f}×",
            overhead_verdict(q["ratio_adapter_over_base"], limit),
        ]
    ]
    cpu = q.get("median_cpu_s")
    if cpu:  # older JSON files have no CPU times
        rows.append(
            [
                "  same, process CPU time (what load on a shared machine does not stretch)",
                fmt_s(cpu["adapter"]),
                fmt_s(cpu["base"]),
                f"{q['ratio_adapter_over_base_cpu']:.3f}×",
                f"≤{limit:.2f}×",
                overhead_verdict(q["ratio_adapter_over_base_cpu"], limit),
            ]
        )
    if q["ratio_base_over_no_hooks"] is not None:
        rows.append(
            [
                "  base with idle hooks vs no hooks installed",
                fmt_s(m["base"]),
                fmt_s(m["base_without_hooks"]),
                f"{q['ratio_base_over_no_hooks']:.3f}×",
                "(info)",
                "",
            ]
        )
    return rows


def mixed_rows(x: Results, on_cuda: bool) -> list[Row]:
    m = x["median_s"]
    speedup = x["ratio_sequential_over_mixed"]
    return [
        [
            f"{x['requests']} requests, own adapters, {x['px']} px, {x['steps']} steps: mixed vs seq.",
            fmt_s(m["mixed"]),
            fmt_s(m["sequential"]),
            f"{speedup:.2f}× throughput",
            "≥1.5× (CUDA target)",
            verdict(speedup >= TARGETS["mixed_speedup"]) if on_cuda else "n/a on CPU",
        ]
    ]


def memory_rows(mem: Results) -> list[Row]:
    rows = [
        [
            f"RSS, {mem['swaps']} swaps, {mem['adapters']} adapters, device tier {mem['device_slots']}",
            f"{mem['rss_before_bytes'] / MIB:.0f} → {mem['rss_after_bytes'] / MIB:.0f} MiB",
            "",
            f"{mem['growth_pct']:+.2f} %",
            "≤2 %",
            verdict(mem["growth_pct"] <= TARGETS["memory_growth_pct"]),
        ]
    ]
    if mem["cuda_allocated_growth_pct"] is not None:
        rows.append(
            [
                "  CUDA memory allocated",
                f"{mem['cuda_before']['allocated'] / MIB:.0f} → "
                f"{mem['cuda_after']['allocated'] / MIB:.0f} MiB",
                "",
                f"{mem['cuda_allocated_growth_pct']:+.2f} %",
                "≤2 %",
                verdict(mem["cuda_allocated_growth_pct"] <= TARGETS["memory_growth_pct"]),
            ]
        )
    return rows


def _paths_rows(out: Results) -> list[Row]:
    from .paths import paths_rows  # the path phases' rows live with them (issue 13)

    return paths_rows(out)


def _preload_rows(out: Results) -> list[Row]:
    from .preload import preload_rows

    return preload_rows(out)
