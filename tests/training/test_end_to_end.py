"""synth data → train → validation loss drops → export → register → the adapter changes a pipeline's
output, and its samples are closer to the data than the base model's (latent statistics distance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from adapters.metadata import parse_header_metadata
from adapters.registry import Registry
from adapters.sources import open_store
from tests.training.conftest import TRIGGER


def test_run_outputs(trained: Any) -> None:
    out: Path = trained.output
    for name in (
        "train_config.toml",
        "plan.json",
        "metrics.jsonl",
        "loss_curve.png",
        "report.json",
        "adapter.safetensors",
    ):
        assert (out / name).is_file(), name
    assert Image.open(out / "loss_curve.png").size == (800, 450)
    assert (out / "samples" / "step-00000030.png").is_file() and (out / "samples" / "final.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(61))
    assert all(set(r) == {"step", "train_loss", "val_loss", "lr", "elapsed_s"} for r in rows)
    assert rows[0]["train_loss"] is None and rows[0]["val_loss"] is not None
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [0, 20, 40, 60]
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == [
        "step-00000030",
        "step-00000060",
    ]


def test_validation_loss_drops_and_base_stays_frozen(trained: Any) -> None:
    evaluation = trained.report["evaluation"]
    assert evaluation["final_val_loss"] < evaluation["initial_val_loss"]
    assert evaluation["best_val_loss"] <= evaluation["final_val_loss"]
    assert evaluation["val_loss_improved"] is True
    assert evaluation["base_weights_unchanged"] is True and len(evaluation["base_weights_sha256"]) == 64


def test_adapter_samples_are_closer_to_the_data(trained: Any) -> None:
    similarity = trained.report["evaluation"]["dataset_similarity"]
    assert similarity["measure"] == "latent_stats_distance"
    assert similarity["adapter"] < similarity["base"]
    assert similarity["adapter_closer"] is True and similarity["relative_improvement"] > 0.05


def test_metadata_is_complete(trained: Any) -> None:
    tensors, header = read_adapter(trained.adapter_path)
    meta = parse_header_metadata(header)
    assert meta is not None
    assert meta.base_model is not None and meta.base_model.name == "tiny-sd"
    assert meta.base_model.fingerprint == trained.plan["base_model"]["fingerprint"]
    assert meta.base_model.architecture_id == trained.plan["base_model"]["architecture_id"]
    assert meta.rank == 8 and meta.alpha == 8.0 and meta.dtype == "fp16" and meta.source_format == "loraswap"
    assert len(meta.target_modules) == 56 and all(m.startswith("unet.") for m in meta.target_modules)
    assert meta.trigger_words == [TRIGGER]
    training = meta.training
    assert training is not None and training.steps == 60 and training.learning_rate == 1e-2
    assert training.started_at is not None and training.finished_at is not None
    extra = training.model_extra or {}
    assert extra["trainer"] == "loraswap-trainer" and extra["trainer_version"]
    assert extra["hyperparameters"]["rank"] == 8 and extra["hyperparameters"]["resolution"] == 32
    assert extra["unet_target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    dataset = meta.dataset
    assert dataset is not None and dataset.num_images == 30 and dataset.sha256
    assert (dataset.model_extra or {})["details"]["val_count"] == 6
    evaluation = meta.evaluation
    assert evaluation is not None
    assert {
        "final_val_loss",
        "best_val_loss",
        "dataset_similarity.base",
        "dataset_similarity.adapter",
    } <= set(evaluation.metrics)
    inference = meta.inference
    assert inference is not None
    assert inference.prompts == [f"{TRIGGER}, a large gold circle on an orange background, sunset style"]
    assert inference.negative_prompt == "blurry" and inference.guidance_scale == 5.0
    assert inference.seeds == [0] and inference.steps == 4 and inference.width == 32
    # kohya / modelspec interoperability keys
    assert header["ss_network_dim"] == "8" and header["ss_network_alpha"] == "8"
    assert header["ss_new_sd_model_hash"] == meta.base_model.fingerprint
    assert header["ss_steps"] == "60" and "ss_training_started_at" in header
    assert header["modelspec.architecture"].endswith("/lora") and header["modelspec.date"]
    assert len(header["sshs_model_hash"]) == 64
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)


def test_registered_reference_resolves(trained: Any, base_model: Any) -> None:
    assert trained.ref == "sunset-style@1"
    registry = Registry(
        open_store(Path(trained.report["hyperparameters"]["store"])), BaseIdentity.from_base_model(base_model)
    )
    loaded = registry.open(trained.ref)
    assert loaded.version.ref == "sunset-style@1"
    assert loaded.metadata.base_model is not None and loaded.metadata.base_model_match is True
    assert loaded.metadata.inference is not None and loaded.metadata.inference.guidance_scale == 5.0
    # the run's loss curve and last sample grid travel with the version (the console shows them)
    pictures = {p.role: p for p in loaded.version.pictures}
    assert sorted(pictures) == ["loss_curve", "samples"]
    assert (pictures["loss_curve"].name, pictures["samples"].name) == ("loss_curve.png", "final.png")
    _, data = registry.read_picture(loaded.version, 0)
    assert data == (trained.output / "loss_curve.png").read_bytes()


def test_exported_file_changes_a_diffusers_pipeline(trained: Any, tiny_model_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def render() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        prompt = f"{TRIGGER}, a small red square on a pink background, sunset style"
        return pipe(
            prompt, height=32, width=32, num_inference_steps=4, generator=generator, output_type="pt"
        ).images

    before = render()
    pipe.load_lora_weights(str(trained.adapter_path), adapter_name="trained")
    with_lora = render()
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    weight_zero = render()
    assert (with_lora - before).abs().max() > 1e-3
    torch.testing.assert_close(weight_zero, before, atol=1e-5, rtol=0)


def test_a_picture_over_the_limits_is_scaled_down(tmp_path: Path) -> None:
    from adapters.pictures import PictureLimits, PictureUpload, check_picture
    from training.pictures import run_pictures

    noise = Image.effect_noise((600, 400), 90).convert("RGB")
    noise.save(tmp_path / "loss_curve.png")
    limits = PictureLimits(max_bytes=40_000, max_pixels=100_000)
    (picture,) = run_pictures(tmp_path, limits)
    checked = check_picture(PictureUpload(picture.data, picture.name, picture.role), limits)
    assert checked.picture.media_type == "image/jpeg" and checked.picture.name == "loss_curve.jpg"
    assert checked.picture.width * checked.picture.height <= 100_000
