"""Tables and JSON for the fuzz runs (the table renderer is the benchmarks' one)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from loadtests.bench_swap.report import render
from loadtests.fuzz.draft import Case

MAX_EMBEDDED_FILE = 64 << 10  # reproducer files up to this size are embedded in the JSON (base64)


def render_rows(rows: list[list[str]]) -> str:
    return render(rows)


def failure_record(case: Case) -> dict[str, Any]:
    """Everything needed to reproduce one failing case by hand."""
    record: dict[str, Any] = {
        "seed_file": case.seed,
        "mutations": list(case.labels),
        "adapter_id": case.adapter_id,
        "metadata": repr(case.metadata)[:300],
        "scale_default": repr(case.scale_default),
        "size": len(case.data),
        "sha256": hashlib.sha256(case.data).hexdigest(),
    }
    if len(case.data) <= MAX_EMBEDDED_FILE:
        record["file_base64"] = base64.b64encode(case.data).decode()
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
