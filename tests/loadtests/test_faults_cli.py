"""``python -m loadtests.faults``: one command runs both fault suites, prints both tables, writes one JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests.faults import __main__ as faults
from loadtests.faults import crash, outage

REPO = Path(__file__).resolve().parents[2]

OUTAGE_ROWS = [
    {"scenario": "pinned id@N", "mode": "refuse", "requests": 1, "outcomes": {"200": 1}, "stale": 0,
     "max_latency_s": 0.1, "expect": "200, no store call", "ok": True, "note": "0 store connections"},
    {"scenario": "uncached adapter", "mode": "refuse", "requests": 1, "outcomes": {"200": 1}, "stale": 0,
     "max_latency_s": 0.1, "expect": "503 + Retry-After", "ok": False, "note": ""},
    {"scenario": "first request after recovery", "mode": "refuse", "requests": 1, "outcomes": {"200": 1},
     "stale": 0, "max_latency_s": 0.4, "expect": "200 within 1.5 s", "ok": True, "note": "",
     "recovery_s": 0.4},
]  # fmt: skip
CRASH_ROW = {column: 0 for column in crash.COLUMNS} | {"scenario": "cli", "store": "local", "kills": 2}


def test_help_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.faults", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--quick", "--seed", "--out"):
        assert flag in result.stdout


@pytest.mark.parametrize("outage_ok", [True, False])
def test_both_suites_are_combined_into_one_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], outage_ok: bool
) -> None:
    calls: dict[str, Any] = {}
    outage_rows = OUTAGE_ROWS if not outage_ok else [{**r, "ok": True} for r in OUTAGE_ROWS]
    crash_rows = [CRASH_ROW, {**CRASH_ROW, "scenario": "server", "kills": 1}]

    def fake_outage(quick: bool) -> list[dict[str, Any]]:
        calls["outage"] = quick
        return outage_rows

    def fake_crash(quick: bool, *, seed: int) -> list[dict[str, Any]]:
        calls["crash"] = (quick, seed)
        return crash_rows

    monkeypatch.setattr(outage, "run", fake_outage)
    monkeypatch.setattr(crash, "run", fake_crash)
    out = tmp_path / "results" / "faults.json"

    code = faults.main(["--quick", "--seed", "7", "--out", str(out)])

    assert calls == {"outage": True, "crash": (True, 7)}
    document = json.loads(out.read_text())
    assert document["outage"] == outage_rows
    assert document["crash"] == crash_rows
    failed = 0 if outage_ok else 1
    assert document["summary"] | {"outage_s": 0, "crash_s": 0} == {
        "scenarios": 5, "passed": 5 - failed, "failed": failed, "outage_s": 0, "crash_s": 0,
        "recovery_s": 0.4,
    }  # fmt: skip
    assert code == (0 if outage_ok else 1)
    printed = capsys.readouterr().out
    assert outage.table(outage_rows) in printed  # each suite's own table, as it prints it
    assert crash.table(crash_rows) in printed
    assert "recovery after the store came back: max 0.40 s (refuse 0.40 s)" in printed


def test_a_crash_problem_fails_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(outage, "run", lambda quick: [{**r, "ok": True} for r in OUTAGE_ROWS])
    monkeypatch.setattr(crash, "run", lambda quick, *, seed: [CRASH_ROW | {"problems": 3}])
    out = tmp_path / "faults.json"
    assert faults.main(["--out", str(out)]) == 1
    assert json.loads(out.read_text())["summary"]["failed"] == 1
