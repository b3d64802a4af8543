"""The resume check the training suites share (SD1.x in ``test_checkpoint``, SDXL, SD3): a run stopped
at a step and resumed with ``--resume latest`` ends as an uninterrupted one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import make_config
from training.checkpoint import resolve_resume
from training.run import RunResult, train


@dataclass(frozen=True)
class ResumedRun:
    """The two runs ``assert_resume_matches`` compared, and the uninterrupted one's final adapter (equal
    to the resumed one's)."""

    straight: RunResult
    resumed: RunResult
    adapter: dict[str, torch.Tensor]


def final_adapter(output: Path) -> dict[str, torch.Tensor]:
    """The adapter of the latest checkpoint of the run in ``output``."""
    return load_file(resolve_resume("latest", output) / "adapter.safetensors")


def metrics_rows(output: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows without their wall-clock times."""
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


def assert_resume_matches(
    data: Path, root: Path, options: Mapping[str, Any], *, models_dir: Path, stop_at: int
) -> ResumedRun:
    """Train ``options`` on ``data`` straight through (in ``root/straight``) and again stopped at step
    ``stop_at`` — what Ctrl-C does — then resumed (in ``root/cut``). The cut run checkpoints at
    ``stop_at``; the resumed one ends at ``options["steps"]`` with the same adapter (within 1e-6), the
    same metrics rows (no duplicated or missing steps) and the same final validation loss."""
    quiet: dict[str, Any] = {"models_dir": models_dir, "echo": lambda *_: None}
    straight = train(make_config(data, root / "straight", **options), **quiet)

    def stop(trainer: Any) -> None:
        if trainer.step == stop_at:
            trainer.request_stop()

    cut = train(make_config(data, root / "cut", **options), on_step=stop, **quiet)
    assert cut.interrupted and cut.loop is not None and cut.loop.step == stop_at
    assert resolve_resume("latest", root / "cut").name == f"step-{stop_at:08d}"
    resumed = train(make_config(data, root / "cut", resume="latest", **options), **quiet)
    assert resumed.loop is not None and resumed.loop.step == options["steps"] and straight.loop is not None

    a, b = final_adapter(root / "straight"), final_adapter(root / "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert metrics_rows(root / "straight") == metrics_rows(root / "cut")
    assert resumed.loop.final_val_loss == pytest.approx(straight.loop.final_val_loss, abs=1e-6)
    return ResumedRun(straight, resumed, a)
