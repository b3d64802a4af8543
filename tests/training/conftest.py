"""Training-suite fixtures: a small synthetic dataset and one shared end-to-end training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from training.config import TrainConfig, build_config
from training.data.synth import synth_dataset

# the shared resume check's asserts report their values as a test module's do
pytest.register_assert_rewrite("tests.training.resume")

TRIGGER = "sks"

# Small enough for 2 CPU cores: 32 px (16x16 latents), batch 4, a few dozen steps.
FAST: dict[str, Any] = {
    "resolution": 32,
    "batch_size": 4,
    "progress": False,
    "sample_steps": 4,
    "sample_seeds": [0],
    "eval_samples": 6,
    "validate_every": 0,
}


def write_image(
    path: Path, colour: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (40, 32)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training + 6 validation 32-px 'sunset' images with .txt captions (trigger word 'sks')."""
    folder = tmp_path_factory.mktemp("synth") / "sunset"
    synth_dataset(folder, n=24, val=6, style="sunset", size=32, seed=0)
    return folder


def make_config(data: Path, output: Path, **overrides: Any) -> TrainConfig:
    return build_config({"data": str(data), "output": str(output)} | FAST | overrides)


@pytest.fixture(scope="session")
def trained(
    tiny_model_dir: Path, loraswap_home: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """One real run shared by the end-to-end tests: train → evaluate → export → register."""
    from training.run import train

    root = tmp_path_factory.mktemp("trained")
    config = make_config(
        synth_dir,
        root / "run",
        steps=60,
        lr=1e-2,
        trigger_word=TRIGGER,
        validate_every=20,
        sample_every=30,
        checkpoint_every=30,
        sample_prompts=["{trigger}, a large gold circle on an orange background, sunset style"],
        negative_prompt="blurry",
        guidance_scale=5.0,
        register_id="sunset-style",
        store=str(root / "store"),
        adapter_id="sunset-style",
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    return result
