"""Checkpoints: pickle-free format, atomic LATEST, pruning, and exact resume equivalence."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.training.conftest import make_config
from tests.training.resume import assert_resume_matches, final_adapter
from training.checkpoint import (
    CHECKPOINTS,
    LATEST,
    capture_rng,
    join_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    split_optimizer_state,
)
from training.errors import CheckpointError, CheckpointNotFound
from training.run import train


def _adamw(seed: int = 0) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(4, 3))
    return param, torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1)


def _step(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
    (param**2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_optimizer_state_round_trip_continues_identically() -> None:
    p1, o1 = _adamw()
    _step(p1, o1)
    tensors, meta = split_optimizer_state(o1.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta)  # everything else is plain JSON
    p2, o2 = _adamw(seed=1)
    with torch.no_grad():
        p2.copy_(p1)
    o2.load_state_dict(join_optimizer_state(tensors, json.loads(json.dumps(meta))))
    _step(p1, o1)
    _step(p2, o2)
    assert torch.equal(p1, p2)


def test_rng_round_trip() -> None:
    generator = torch.Generator().manual_seed(5)
    state = json.loads(json.dumps(capture_rng(generator)))
    expected = (torch.rand(3), torch.rand(3, generator=generator), random.random(), np.random.rand())
    restore_rng(state, generator)
    again = (torch.rand(3), torch.rand(3, generator=generator), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def _save(output: Path, step: int, keep: int = 2) -> Path:
    param, optimizer = _adamw()
    _step(param, optimizer)
    return save_checkpoint(
        output,
        step,
        adapter={"unet.x.lora_A.default.weight": param.detach()},
        optimizer=optimizer.state_dict(),
        state={"epoch": 0, "position": step},
        keep=keep,
    )


def test_latest_pointer_pruning_and_pickle_free_files(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step)
    root = tmp_path / CHECKPOINTS
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert (root / LATEST).read_text().strip() == "step-00000030"
    assert resolve_resume("latest", tmp_path) == root / "step-00000030"
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == root / "step-00000030"  # a run folder
    files = {f.name for f in (root / "step-00000030").iterdir()}
    assert files == {"adapter.safetensors", "optimizer.safetensors", "state.json"}
    loaded = load_checkpoint(root / "step-00000030")
    assert loaded.step == 30 and loaded.state["position"] == 30 and "rng" not in loaded.state
    # a half-written checkpoint (no state.json) and leftover staging folders are never picked
    (root / "step-00000040").mkdir()
    (root / ".step-00000050.tmpxyz").mkdir()
    (root / LATEST).unlink()
    assert resolve_resume("latest", tmp_path) == root / "step-00000030"


def test_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        resolve_resume("latest", tmp_path)
    with pytest.raises(CheckpointNotFound):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    path = _save(tmp_path, 1)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path)


RESUME_OPTIONS: dict[str, Any] = {
    "steps": 6,
    "batch_size": 2,
    "grad_accum": 2,
    "random_flip": True,
    "dropout": 0.1,  # uses the global torch RNG
    "lr": 5e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 2,
    "snr_gamma": 5.0,
    "noise_offset": 0.05,
    "validate_every": 3,
    "val_timesteps": 2,
    "eval_samples": 0,
    "sample_steps": 1,
    "export": False,
}


def test_resumed_run_reaches_the_same_weights(loraswap_home: Path, synth_dir: Path, tmp_path: Path) -> None:
    models = loraswap_home / "models"
    run = assert_resume_matches(synth_dir, tmp_path, RESUME_OPTIONS, models_dir=models, stop_at=3)
    assert run.straight.loop is not None and run.straight.loop.step == 6 and not run.straight.interrupted
    assert any(float(v.abs().sum()) > 0 for k, v in run.adapter.items() if "lora_B" in k)


def test_resume_refuses_a_different_run(loraswap_home: Path, synth_dir: Path, tmp_path: Path) -> None:
    quiet = {"models_dir": loraswap_home / "models", "echo": lambda *_: None}
    options = RESUME_OPTIONS | {"steps": 1, "validate_every": 0}
    train(make_config(synth_dir, tmp_path / "run", **options), **quiet)
    with pytest.raises(CheckpointError, match="lora"):
        train(make_config(synth_dir, tmp_path / "run", resume="latest", **(options | {"rank": 4})), **quiet)


def test_resume_at_an_epoch_boundary_reaches_the_same_weights(
    loraswap_home: Path, synth_dir: Path, tmp_path: Path
) -> None:
    """24 images, batch 2 x accumulation 2: 6 steps per epoch. Cut at step 6 (the end of epoch 0), the
    resumed run draws epoch 1's order, so the uninterrupted run must too (it once went on in epoch 0's)."""
    quiet = {"models_dir": loraswap_home / "models", "echo": lambda *_: None}
    options = RESUME_OPTIONS | {"steps": 8, "validate_every": 0, "dropout": 0.0}
    train(make_config(synth_dir, tmp_path / "straight", **options), **quiet)

    def stop_at_6(trainer: Any) -> None:
        if trainer.step == 6:
            trainer.request_stop()

    cut = train(make_config(synth_dir, tmp_path / "cut", **options), on_step=stop_at_6, **quiet)
    assert cut.loop is not None and cut.loop.step == 6
    state = json.loads((resolve_resume("latest", tmp_path / "cut") / "state.json").read_text())
    assert (state["epoch"], state["position"]) == (1, 0)
    train(make_config(synth_dir, tmp_path / "cut", resume="latest", **options), **quiet)
    a, b = final_adapter(tmp_path / "straight"), final_adapter(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
