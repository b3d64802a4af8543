"""A LoRA you can see, scaled down: the real ``loraswap data synth --concept`` and ``loraswap train``
CLI, then the adapter applied through the serving engine's hooks (``loadtests.lora_demo.HotSwap``)
must make the brown concept appear where the base model draws none (same prompts, same seeds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.lora_demo import DemoSettings, HotSwap, evaluate, load_pipe, loraswap, synth_args, train_args

# Small enough for CI on 2 shared cores: 24 images, 150 steps at 32 px, 3 prompts x 2 seeds, 12 DDIM steps.
# Measured on the shipped tiny-sd: adapter 100% brown, base 0% (these 6 images); see docs/training.md.
SMALL = DemoSettings(
    base_model="tiny-sd",
    n=24,
    val=0,
    steps=150,
    lr=5e-3,
    concept_prompts=3,
    seeds=2,
    sample_steps=12,
    extra_train_args=[
        "--no-progress",
        "--validate-every",
        "0",
        "--eval-samples",
        "0",
        "--sample-steps",
        "2",
        "--sample-seeds",
        "0",
    ],
)


@pytest.fixture
def home(loraswap_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    return loraswap_home


def test_trained_adapter_makes_the_concept_appear(home: Path, tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    loraswap(synth_args(SMALL, data))
    loraswap(train_args(SMALL, data, run))
    _, pipe = load_pipe(SMALL.base_model)
    swap = HotSwap(pipe, run / "adapter.safetensors")
    try:
        result = evaluate(pipe, swap, SMALL, standard=False)
    finally:
        swap.close()
    base = result["scores"]["base"]["concept"]
    adapter = result["scores"]["adapter"]["concept"]
    assert base["images"] == adapter["images"] == 6
    # the base model has never seen "brown": it draws other colours for these prompts
    assert base["concept_pct"] <= 20.0, base
    assert adapter["concept_pct"] >= base["concept_pct"] + 50.0, (base, adapter)
    # hooks are gone: the pipeline is the base model again
    again = evaluate(pipe, None, SMALL, standard=False)
    assert (again["images"]["base_concept"] == result["images"]["base_concept"]).all()
