"""Training on SDXL (tiny-sdxl-random, fp32, CPU) and SD2.x (v-prediction).

SDXL conditioning as diffusers' ``train_text_to_image_lora_sdxl.py``: both encoders' penultimate
hidden states and the pooled projection, per-image ``time_ids`` from the original size, the crop and
the bucket; UNet LoRA by default, ``--train-text-encoder`` on both encoders; resume equals an
uninterrupted run; the export loads in ``StableDiffusionXLPipeline.load_lora_weights`` and, registered
with ``--register``, is served by our server as diffusers draws it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from adapters.format import read_adapter
from adapters.metadata import parse_header_metadata
from basemodel.families import get_family
from basemodel.families.sdxl.tiny import build_tiny_sdxl_pipeline
from basemodel.loader import BaseModel, load_base_model
from tests.basemodel.test_families import build_tiny_sd2
from tests.service.conftest import start_server  # noqa: F401  (fixture)
from tests.service.test_sdxl import diffusers_reference, images, max_diff
from tests.training.conftest import make_config
from tests.training.resume import assert_resume_matches
from training.checkpoint import resolve_resume
from training.conditioning import Conditioner
from training.data.buckets import crop_geometry, resize_crop
from training.data.synth import synth_dataset
from training.run import train

SDXL = "tiny-sdxl-random"
FAST_XL: dict[str, Any] = {"base_model": SDXL, "batch_size": 2, "sample_steps": 2, "eval_samples": 2}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training + 2 validation images; four of them 48x24 / 24x48 (three buckets at 32 px)."""
    folder = tmp_path_factory.mktemp("xl-data") / "neon"
    paths = synth_dataset(folder, n=8, val=2, style="neon", size=48, seed=2)
    for i, path in enumerate(paths[:4]):
        Image.open(path).resize((48, 24) if i % 2 else (24, 48)).save(path)
    return folder


@pytest.fixture(scope="module")
def xl_trained(loraswap_home: Path, mixed_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A UNet LoRA on tiny-sdxl-random: buckets, flips, validation, samples, checkpoints, disk cache,
    export and registration."""
    root = tmp_path_factory.mktemp("xl-trained")
    config = make_config(
        mixed_data,
        root / "run",
        **FAST_XL,
        steps=6,
        lr=2e-2,
        buckets=True,
        random_flip=True,
        validate_every=3,
        sample_every=3,
        checkpoint_every=3,
        cache="disk",
        sample_prompts=["a neon circle"],
        register_id="xl-style",
        store=str(root / "store"),
    )
    return train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)


def test_time_ids_of_a_cropped_bucketed_sample(tmp_path: Path) -> None:
    """A 53x30 image in the 48x32 bucket: scaled to 57x32 and cut at left 4, top 0. Its time ids are
    diffusers' (original h, w) + (top, left) + (target h, w), the pipeline's ``_get_add_time_ids``
    gives the same, and the flipped sample's crop is the mirrored one (left 5): flipping the crop equals
    cropping the flipped image there."""
    pipe = build_tiny_sdxl_pipeline()
    conditioner = Conditioner(get_family("sdxl"), pipe)
    image = Image.effect_noise((53, 30), 64).convert("RGB")
    crop = crop_geometry(image.width, image.height, (48, 32))
    assert (crop.scaled, crop.left, crop.top) == ((57, 32), 4, 0)
    scaled = image.resize(crop.scaled, Image.Resampling.BICUBIC)
    assert resize_crop(image, (48, 32)).tobytes() == scaled.crop((4, 0, 52, 32)).tobytes()

    original_size, target_size = (image.height, image.width), (32, 48)
    for flipped, left in ((False, 4), (True, 5)):
        ids = conditioner.size_conditioning(crop, flipped=flipped)["time_ids"]
        crops_coords_top_left = (0, left)
        # train_text_to_image_lora_sdxl.py: compute_time_ids(original_size, crops_coords_top_left)
        expected = list(original_size + crops_coords_top_left + target_size)
        assert ids.tolist() == expected
        reference = pipe._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=torch.float32,
            text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim),
        )
        assert torch.equal(ids[None], reference)
    mirrored = ImageOps.mirror(scaled).crop((5, 0, 53, 32))
    assert ImageOps.mirror(resize_crop(image, (48, 32))).tobytes() == mirrored.tobytes()
    assert get_family("sd1").size_conditioning((30, 53), (0, 4), (32, 48)) == {}


def test_training_text_is_what_the_pipeline_encodes() -> None:
    """Penultimate hidden states of both encoders, concatenated, and text_encoder_2's projection: the
    tensors ``StableDiffusionXLPipeline.encode_prompt`` gives for the same captions."""
    pipe = build_tiny_sdxl_pipeline()
    conditioner = Conditioner(get_family("sdxl"), pipe)
    captions = ["a red circle", "a blue square on a green background"]
    with torch.no_grad():
        text = conditioner.encode_text(conditioner.tokenize(captions))
        hidden, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert set(text) == {"hidden", "text_embeds"}
    assert text["hidden"].shape == (2, 77, 96) and text["text_embeds"].shape == (2, 48)
    torch.testing.assert_close(text["hidden"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(text["text_embeds"], pooled, rtol=0, atol=0)


def test_sdxl_unet_lora_run(xl_trained: Any) -> None:
    out: Path = xl_trained.output
    report = xl_trained.report
    assert report is not None and xl_trained.plan["base_model"]["family"] == "sdxl"
    assert sorted(xl_trained.plan["sizes"]) == [(24, 40), (32, 32), (40, 24)]
    assert xl_trained.plan["modules"]["text_encoder"] == xl_trained.plan["modules"]["text_encoder_2"] == 0
    assert xl_trained.plan["memory"]["activations_bytes_per_image"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [0, 3, 6]
    assert all(r["train_loss"] is None or r["train_loss"] > 0 for r in rows)
    assert (out / "samples" / "step-00000003.png").is_file() and (out / "samples" / "final.png").is_file()
    checkpoints = [p.name for p in sorted((out / "checkpoints").glob("step-*"))]
    assert checkpoints == ["step-00000003", "step-00000006"]
    evaluation = report["evaluation"]
    assert evaluation["base_weights_unchanged"] is True and "dataset_similarity" in evaluation
    # the embedding cache holds both encoders' conditioning, one entry per caption
    text_entries = list((out / "cache" / "text").glob("*.safetensors"))
    assert text_entries and set(load_file(text_entries[0])) == {"hidden", "text_embeds"}
    assert load_file(text_entries[0])["hidden"].shape == (77, 96)

    tensors, header = read_adapter(xl_trained.adapter_path)
    assert {k.split(".", 1)[0] for k in tensors} == {"unet"}
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    meta = parse_header_metadata(header)
    assert meta is not None and meta.base_model is not None
    assert (meta.base_model.name, meta.base_model.family) == (SDXL, "sdxl")
    assert xl_trained.ref == "xl-style@1"


def test_sdxl_text_encoder_lora_covers_both_encoders(
    loraswap_home: Path, mixed_data: Path, tmp_path: Path
) -> None:
    options = {"steps": 2, "lr": 1e-2, "train_text_encoder": True, "gradient_checkpointing": True}
    # 34 attention layers x 4 projections in the UNet; 2 layers x 4 in each text encoder
    config = make_config(mixed_data, tmp_path / "te", **(FAST_XL | options | {"eval_samples": 0}))
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.plan["modules"] == {"unet": 136, "text_encoder": 8, "text_encoder_2": 8}
    tensors, _ = read_adapter(result.adapter_path)
    assert {k.split(".", 1)[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    for component in ("text_encoder", "text_encoder_2"):  # both trained: their lora_B left zero
        moved = [v for k, v in tensors.items() if k.startswith(f"{component}.") and ".lora_B." in k]
        assert moved and any(float(v.float().abs().sum()) > 0 for v in moved), component
    saved = load_file(resolve_resume("latest", tmp_path / "te") / "adapter.safetensors")
    assert any(k.startswith("text_encoder_2.") for k in saved)


RESUME: dict[str, Any] = FAST_XL | {
    "steps": 3,
    "buckets": True,
    "random_flip": True,
    "train_text_encoder": True,
    "dropout": 0.1,
    "lr": 5e-3,
    "lr_scheduler": "cosine",
    "snr_gamma": 5.0,
    "noise_offset": 0.05,
    "validate_every": 2,
    "val_timesteps": 1,
    "eval_samples": 0,
    "sample_steps": 1,
    "sample_prompts": ["a neon circle"],
    "export": False,
}


def test_sdxl_resume_reaches_the_same_weights(loraswap_home: Path, mixed_data: Path, tmp_path: Path) -> None:
    run = assert_resume_matches(mixed_data, tmp_path, RESUME, models_dir=loraswap_home / "models", stop_at=2)
    assert any(k.startswith("text_encoder_2.") for k in run.adapter)


@pytest.fixture(scope="module")
def sdxl(loraswap_home: Path) -> BaseModel:
    return load_base_model(SDXL, loraswap_home / "models", device="cpu", dtype="fp32")


def test_exported_sdxl_adapter_serves_as_diffusers_draws_it(
    xl_trained: Any, sdxl: BaseModel, start_server: Any
) -> None:
    """The exported file in StableDiffusionXLPipeline.load_lora_weights, and the version --register
    stored, served by our server: the same pixels within 1/255, and visibly not the base's."""
    store = xl_trained.report["hyperparameters"]["store"]
    server = start_server(loader=lambda _: sdxl, store=store)
    request = {"prompt": "a neon circle"}
    plain = images(server, **request)
    ours = images(server, **request, adapters=[{"id": "xl-style"}])
    theirs = diffusers_reference(sdxl.ref.path, [(xl_trained.adapter_path, 1.0)], **request)
    assert max_diff(ours, theirs) <= 1
    assert max_diff(ours, plain) > 3, "the trained adapter must change the image"


def test_sd2_trains_with_v_prediction(loraswap_home: Path, mixed_data: Path, tmp_path: Path) -> None:
    """SD2.x 768-v: the objective follows the base scheduler's v_prediction; the export is an sd2 one."""
    folder = build_tiny_sd2(tmp_path / "tiny-sd2")
    config = make_config(
        mixed_data,
        tmp_path / "run",
        base_model=str(folder),
        steps=2,
        batch_size=2,
        validate_every=1,
        eval_samples=0,
        sample_steps=1,
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.report is not None and result.plan["base_model"]["family"] == "sd2"
    assert result.report["hyperparameters"]["prediction_type_effective"] == "v_prediction"
    evaluation = result.report["evaluation"]
    assert evaluation["initial_val_loss"] is not None and evaluation["final_val_loss"] is not None
    _, header = read_adapter(result.adapter_path)
    assert header["ss_base_model_version"] == "sd_v2_v"  # 768-v, not the 512 (epsilon) label
    assert header["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert header["modelspec.prediction_type"] == "v"
    meta = parse_header_metadata(header)
    assert meta is not None and meta.base_model is not None and meta.base_model.family == "sd2"
    assert meta.base_model.prediction_type == "v_prediction"
