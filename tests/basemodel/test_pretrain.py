"""Issue 6: the pretrained embedded model, its pretraining run and the prompt-following checker."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from basemodel.pretrain.checker import (
    FRAME,
    _augment,
    load_classifier,
    procedural_accuracy,
    read_images,
    score,
)
from basemodel.pretrain.data import COLOURS, MARGIN, SHAPES, caption, prompt_set, sample_batch
from basemodel.pretrain.train import Recipe, pretrain
from basemodel.tiny import build_tiny_pipeline

WEIGHTS = Path(__file__).resolve().parents[2] / "basemodel" / "weights"
SHIPPED = WEIGHTS / "tiny-sd"


def _sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def test_shipped_weights_match_their_sha256_and_stay_small() -> None:
    sums = _sums(SHIPPED)
    assert "unet/diffusion_pytorch_model.safetensors" in sums
    for name, digest in sums.items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
    weights = [p for p in SHIPPED.rglob("*.safetensors")]
    assert len(weights) == 3
    assert sum(p.stat().st_size for p in weights) <= 20 * 1024 * 1024
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["command"].startswith("loraswap model pretrain-tiny")


def test_shipped_weights_load_as_fp16_sd_pipeline_with_the_pretrain_architecture() -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    for weights in SHIPPED.rglob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}, weights  # noqa: SIM118
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, local_files_only=True, use_safetensors=True)
    random_init = build_tiny_pipeline(0)
    for part in ("unet", "vae", "text_encoder"):
        shipped = {k: tuple(v.shape) for k, v in getattr(pipe, part).state_dict().items()}
        fresh = {k: tuple(v.shape) for k, v in getattr(random_init, part).state_dict().items()}
        assert shipped == fresh, part
    assert dict(pipe.scheduler.config)["beta_schedule"] == "scaled_linear"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.tokenizer.tokenize("a red circle on a blue background") == [
        "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>",
    ]  # fmt: skip


def test_tiny_sd_spec_installs_the_shipped_weights_checked(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from basemodel.errors import BaseModelError
    from basemodel.loader import resolve_base_model
    from basemodel.pretrain.shipped import checksums, install

    ref = resolve_base_model("tiny-sd", tmp_path / "models")
    assert ref.path == tmp_path / "models" / "tiny-sd"
    assert set(checksums(ref.path)) == set(checksums(SHIPPED))
    for name, digest in checksums(ref.path).items():  # installed files match their own checksums
        assert hashlib.sha256((ref.path / name).read_bytes()).hexdigest() == digest, name
        if name.endswith(".safetensors"):  # expanded to fp32 exactly
            installed, shipped = load_file(str(ref.path / name)), load_file(str(SHIPPED / name))
            assert set(installed) == set(shipped)
            assert all(installed[k].dtype == torch.float32 for k in installed)
            assert all(torch.equal(installed[k], shipped[k].float()) for k in shipped)
    assert json.loads((ref.path / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    again = install(tmp_path / "deterministic")
    assert checksums(again) == checksums(ref.path)
    tampered = tmp_path / "tampered"
    install(tampered)
    weights = tampered / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match="sha256"):
        install(tmp_path / "again", source=tampered)
    assert not (tmp_path / "again").exists()


def test_stale_or_random_install_is_replaced_by_the_shipped_weights(tmp_path: Path) -> None:
    from basemodel.loader import resolve_base_model
    from basemodel.pretrain.shipped import SOURCE_STAMP, checksums, source_digest
    from basemodel.tiny import save_tiny

    models = tmp_path / "models"
    save_tiny(models / "tiny-sd", seed=0)  # what `tiny-sd` was before the pretrained weights
    ref = resolve_base_model("tiny-sd", models)
    assert (ref.path / SOURCE_STAMP).read_text().strip() == source_digest()
    assert set(checksums(ref.path)) == set(checksums(SHIPPED))
    (ref.path / SOURCE_STAMP).write_text("0" * 64 + "\n")  # installed from other (older) weights
    weights = ref.path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"stale")
    resolve_base_model("tiny-sd", models)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest == checksums(ref.path)["unet/diffusion_pytorch_model.safetensors"]
    random_ref = resolve_base_model("tiny-sd-random", models)
    assert random_ref.path == models / "tiny-sd-random" and not (random_ref.path / SOURCE_STAMP).exists()


def test_cli_installs_the_pretrained_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    from basemodel.pretrain.shipped import checksums

    out = tmp_path / "pre"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "init-tiny", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LORASWAP_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    assert set(checksums(out)) == set(checksums(SHIPPED))


def _weight_sums(folder: Path) -> dict[str, str]:
    return {k: v for k, v in _sums(folder).items() if k.endswith(".safetensors")}


def test_short_pretraining_run_is_deterministic(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [
            pretrain(tmp_path / f"run{i}", Recipe(vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4))
            for i in range(2)
        ]
        other = pretrain(
            tmp_path / "seed1", Recipe(seed=1, vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4)
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert _weight_sums(runs[0]) == _weight_sums(runs[1])
    assert _weight_sums(other) != _weight_sums(runs[0])
    recipe = json.loads((runs[0] / "recipe.json").read_text())
    assert (recipe["vae_steps"], recipe["unet_steps"]) == (2, 2)
    assert (runs[0] / "model_index.json").is_file()


def test_dataset_is_captioned_and_keeps_a_pure_background_frame() -> None:
    batch = sample_batch(64, torch.Generator().manual_seed(3))
    assert batch.images.shape == (64, 3, 32, 32)
    assert FRAME < MARGIN
    assert (batch.fg != batch.bg).all()
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False  # the checker's frame, inside the MARGIN
    for i in range(64):
        edge = batch.images[i][:, frame]
        assert (edge - edge[:, :1]).abs().max() < 1e-6  # one colour all round
        words = batch.captions[i].split()
        assert COLOURS[int(batch.fg[i])] in words and SHAPES[int(batch.shape[i])] in words


def test_prompt_set_is_fixed_and_balanced() -> None:
    prompts = prompt_set(48)
    assert prompts == prompt_set(48) and len(set(prompts)) == 48
    assert all(f != b for _, f, b in prompts)
    assert max(Counter(s for s, _, _ in prompts).values()) <= 10
    assert set(Counter(f for _, f, _ in prompts).values()) == {6}
    assert set(Counter(b for _, _, b in prompts).values()) == {6}
    assert caption(*prompts[0]).endswith("background")


def test_checker_reads_real_procedural_images_correctly() -> None:
    accuracy = procedural_accuracy(n=256, seed=4321)
    assert accuracy["background_pct"] >= 99.0
    assert accuracy["shape_colour_pct"] >= 99.0
    assert accuracy["shape_kind_pct"] >= 97.0


def test_checker_tolerates_noisy_images_and_flags_empty_ones() -> None:
    batch = sample_batch(256, torch.Generator().manual_seed(99))
    noisy = _augment((batch.images + 1) / 2, torch.Generator().manual_seed(5))
    expected = [
        (SHAPES[int(s)], COLOURS[int(f)], COLOURS[int(b)])
        for s, f, b in zip(batch.shape, batch.fg, batch.bg, strict=True)
    ]
    result = score(read_images(noisy, load_classifier()), expected)
    assert result["background_pct"] >= 95.0
    assert result["shape_colour_pct"] >= 90.0
    assert result["shape_kind_pct"] >= 90.0
    blank = torch.zeros(2, 3, 32, 32)
    blank[1, 0] = 1.0  # plain red
    readings = read_images(blank)
    assert [r.background for r in readings] == ["black", "red"]
    assert all(r.shape is None and r.shape_colour is None for r in readings)


@pytest.mark.parametrize("size", [32, 64])
def test_checker_accepts_uint8_arrays_of_any_size(size: int) -> None:
    batch = sample_batch(8, torch.Generator().manual_seed(7))
    x = torch.nn.functional.interpolate((batch.images + 1) / 2, size=(size, size), mode="nearest")
    arrays = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    readings = read_images(arrays)
    assert [r.background for r in readings] == [COLOURS[int(b)] for b in batch.bg]


def test_eval_during_pretraining_logs_scores_and_keeps_the_best(tmp_path: Path, monkeypatch) -> None:
    from basemodel.pretrain import train

    monkeypatch.setattr(train, "EVAL_PROMPTS", 5)
    monkeypatch.setattr(train, "EVAL_STEPS", 2)
    monkeypatch.setattr(train, "EVAL_SEEDS", [7])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pretrain(
            tmp_path / "run",
            Recipe(vae_from=str(SHIPPED), unet_steps=3, unet_batch=4, evals=2),
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    lines = [json.loads(x) for x in Path(f"{out}.evals.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # every 3 // 2 = 1 step, and the last one
    assert all(x["images"] == 5.0 and x["seeds"] == [7] for x in lines)
    assert all(0.0 <= x["shape_kind_pct"] <= 100.0 for x in lines)
    best = Path(f"{out}.best")
    chosen = json.loads((best / "eval.json").read_text())
    rank = [(min(x["target_margin"], 1.0), x["all_three_pct"]) for x in lines]
    assert (min(chosen["target_margin"], 1.0), chosen["all_three_pct"]) == max(rank)
    assert int((best / "step.txt").read_text()) == chosen["step"]
    assert (
        _weight_sums(best)["vae/diffusion_pytorch_model.safetensors"]
        == _sums(SHIPPED)["vae/diffusion_pytorch_model.safetensors"]
    )  # --vae-from keeps the VAE bit for bit


def test_shipped_model_follows_prompts() -> None:
    """A small slice of the reported check (docs/benchmarks.md): 15 prompts, 3 per shape, one seed."""
    from diffusers import StableDiffusionPipeline

    from basemodel.pretrain.evaluate import prompt_scores

    pipe = StableDiffusionPipeline.from_pretrained(
        SHIPPED, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    result = prompt_scores(pipe, seeds=[0], prompts=15, steps=20)
    assert result["background_pct"] >= 90.0
    assert result["shape_colour_pct"] >= 80.0
    assert result["shape_kind_pct"] >= 70.0
