"""``loraswap train`` / ``loraswap data``: dry run, errors, and Ctrl-C → checkpoint → resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from service.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(loraswap_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    return loraswap_home


def test_data_synth_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "data",
                "synth",
                str(tmp_path / "ds"),
                "--n",
                "6",
                "--style",
                "pastel",
                "--size",
                "24",
                "--trigger-word",
                "zz",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "ds").glob("*.png"))) == 6
    assert "wrote 6 images" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "ds"), "--val-split", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_count"] == 3 and summary["val_count"] == 3 and summary["skipped_count"] == 0


def test_dry_run_prints_the_plan_and_writes_nothing(
    home: Path, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        "train",
        "--data",
        str(synth_dir),
        "--output",
        str(out),
        "--dry-run",
        "--resolution",
        "32",
        "--epochs",
        "3",
    ]
    assert (
        main([*argv, "--target-modules", "to_q", "to_v", "ff.net.2", "--rank", "4", "--batch-size", "6"]) == 0
    )
    text = capsys.readouterr().out
    assert "24 train / 6 validation images, 0 skipped" in text
    assert "12 steps = 3.0 epochs (4 steps/epoch)" in text
    assert "UNet to_q, to_v, ff.net.2 -> 35 modules" in text
    assert "trainable" in text and "memory (est.)" in text and "GiB" in text
    assert f"on finish: export {out / 'adapter.safetensors'}; nothing registered" in text  # said on start
    assert not out.exists()


def test_user_errors_are_reported_not_raised(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--dora"]) == 2
    )
    assert "error[dataset_error]" in capsys.readouterr().err  # DoRA exports: the data is what is wrong
    assert main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "error[dataset_error]" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "o")]) == 2
    assert "data: required" in capsys.readouterr().err
    # registration problems surface before any training
    missing = ["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]
    assert main([*missing, "--register", "Not An Id"]) == 2
    assert "invalid adapter id 'Not An Id'" in capsys.readouterr().err
    assert main([*missing, "--register", "ok", "--rank", "512", "--store", str(tmp_path / "s")]) == 2
    assert "above the registry's limit 256" in capsys.readouterr().err


def test_base_pin_and_existing_run_are_checked(
    home: Path, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["train", "--data", str(synth_dir), "--resolution", "32", "--steps", "1"]
    assert main([*common, "--output", str(tmp_path / "a"), "--base-model-sha256", "deadbeef"]) == 2
    assert "error[base_model_error]" in capsys.readouterr().err
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    assert main([*common, "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (checkpoints)" in err and "--resume latest" in err


def _rows(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def test_ctrl_c_checkpoints_and_resume_continues(
    loraswap_home: Path, synth_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = os.environ | {"LORASWAP_HOME": str(loraswap_home), "PYTHONPATH": str(REPO)}
    common = [
        "--resolution",
        "32",
        "--no-progress",
        "--sample-steps",
        "2",
        "--sample-seeds",
        "0",
        "--eval-samples",
        "2",
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "train",
            "--data",
            str(synth_dir),
            "--output",
            str(out),
            "--steps",
            "5000",
            *common,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 900  # hang catcher, not a speed limit
        while time.monotonic() < deadline and not any(
            int(r["step"]) >= 2 for r in _rows(out / "metrics.jsonl")
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "resume with: loraswap train --output" in stdout
    stopped = int(_rows(out / "metrics.jsonl")[-1]["step"])
    assert (out / "checkpoints" / f"step-{stopped:08d}" / "state.json").is_file()
    assert not (out / "adapter.safetensors").exists()
    # the checkpoint's saved config is reused: only --output, --resume and the new step count are needed
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "train",
            "--output",
            str(out),
            "--resume",
            "latest",
            "--steps",
            str(stopped + 2),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # hang catcher: one run took >240 s at load average 20
    )
    assert done.returncode == 0, done.stderr
    assert f"trained {stopped + 2} steps" in done.stdout and (out / "adapter.safetensors").is_file()
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == list(range(stopped + 3))
