"""Model families: detection (folders, configs, checkpoint keys), tiny-sdxl-random, architecture ids."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters.identity import BaseIdentity
from basemodel.errors import BaseModelError
from basemodel.families import (
    ModelSignals,
    declared_by,
    detect,
    detect_checkpoint,
    detect_folder,
    get_family,
)
from basemodel.families.sdxl.tiny import save_tiny_sdxl
from basemodel.fingerprint import Architecture
from basemodel.loader import load_base_model
from tests.basemodel.test_tiny_and_identity import tree_digest

SD1_UNET = {"cross_attention_dim": 768, "addition_embed_type": None}
SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}
SD_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
}
XL_COMPONENTS = SD_COMPONENTS | {"text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("xl") / "tiny-sdxl-random", seed=0)


@pytest.mark.parametrize(
    ("pipeline", "unet", "components", "family"),
    [
        ("StableDiffusionPipeline", SD1_UNET, SD_COMPONENTS, "sd1"),
        ("StableDiffusionPipeline", {"cross_attention_dim": 64}, SD_COMPONENTS, "sd1"),  # tiny-sd
        ("StableDiffusionPipeline", {"cross_attention_dim": 1024}, SD_COMPONENTS, "sd2"),
        ("StableDiffusionXLPipeline", SDXL_UNET, XL_COMPONENTS, "sdxl"),
        ("StableDiffusionXLPipeline", {**SDXL_UNET, "cross_attention_dim": 96}, XL_COMPONENTS, "sdxl"),
        (None, SDXL_UNET, {}, "sdxl"),  # a bare UNet config: text_time conditioning is SDXL's
        (None, {"cross_attention_dim": 1024}, {}, "sd2"),
        (None, SD1_UNET, {}, "sd1"),
    ],
)
def test_detection_from_pipeline_class_and_unet_config(
    pipeline: str | None, unet: dict[str, Any], components: dict[str, Any], family: str
) -> None:
    assert detect(ModelSignals(pipeline, unet, components)).name == family


@pytest.mark.parametrize(
    ("pipeline", "unet", "components", "message"),
    [
        ("StableDiffusionXLPipeline", SD1_UNET, XL_COMPONENTS, "no 'text_time' added conditioning"),
        ("StableDiffusionXLPipeline", SDXL_UNET, SD_COMPONENTS, "it has no text_encoder_2"),
        ("StableDiffusionPipeline", SDXL_UNET, SD_COMPONENTS, "added conditioning 'text_time'"),
        ("StableDiffusionPipeline", SD1_UNET, XL_COMPONENTS, "second text encoder"),
        ("QwenImagePipeline", {}, {}, r"QwenImagePipeline of no supported model family"),
        ("FluxPipeline", {}, {}, r"its transformer config has no 'num_single_layers'"),
        ("StableDiffusion3Pipeline", SD1_UNET, {}, r"its transformer config has no 'joint_attention_dim'"),
    ],
)
def test_contradictions_and_unknown_pipelines_are_refused(
    pipeline: str, unet: dict[str, Any], components: dict[str, Any], message: str
) -> None:
    with pytest.raises(BaseModelError, match=message):
        detect(ModelSignals(pipeline, unet, components))


def test_detection_never_reads_the_name(tiny_model_dir: Path, sdxl_dir: Path, tmp_path: Path) -> None:
    assert detect_folder(tiny_model_dir).name == "sd1"
    assert detect_folder(sdxl_dir).name == "sdxl"
    misnamed = shutil.copytree(tiny_model_dir, tmp_path / "sdxl-base-1.0")
    assert detect_folder(misnamed).name == "sd1"
    index = json.loads((misnamed / "model_index.json").read_text())
    (misnamed / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"})
    )
    with pytest.raises(BaseModelError, match="no 'text_time'"):
        detect_folder(misnamed)


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"],
            "sd1",
        ),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding"], "sd2"),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.0.transformer.text_model.x",
                "conditioner.embedders.1.model.token_embedding.weight",
            ],
            "sdxl",
        ),
        (["cond_stage_model.transformer.text_model.x"], None),  # no UNet
        (["lora_unet_down_blocks_0.lora_down.weight"], None),
    ],
)
def test_detection_from_single_file_keys(keys: list[str], family: str | None) -> None:
    found = detect_checkpoint(keys)
    assert (found.name if found else None) == family


def test_adapter_headers_declare_families_by_their_interop_names() -> None:
    assert declared_by({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})[0].name == "sdxl"  # type: ignore[index]
    assert declared_by({"ss_base_model_version": "sdxl_base_v1-0"})[0].name == "sdxl"  # type: ignore[index]
    assert declared_by({"ss_base_model_version": "sd_v2_v"})[0].name == "sd2"  # type: ignore[index]
    assert declared_by({"modelspec.architecture": "stable-diffusion-v1/lora"})[0].name == "sd1"  # type: ignore[index]
    assert declared_by({"ss_base_model_version": "None"}) is None
    assert declared_by({}) is None
    sd2 = get_family("sd2")
    assert sd2.modelspec_architecture("v_prediction") == "stable-diffusion-v2-768-v/lora"
    assert (
        get_family("sdxl").kohya_prefix("text_encoder_2"),
        get_family("sd1").kohya_prefix("text_encoder"),
    ) == (
        "lora_te2_",
        "lora_te_",
    )


def test_tiny_sdxl_random_is_sdxl_shaped_and_byte_identical_per_seed(sdxl_dir: Path, tmp_path: Path) -> None:
    again = save_tiny_sdxl(tmp_path / "again", seed=0)
    other = save_tiny_sdxl(tmp_path / "other", seed=1)
    assert tree_digest(again) == tree_digest(sdxl_dir)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert tree_digest(other)[weights] != tree_digest(sdxl_dir)[weights]
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert max(unet["transformer_layers_per_block"]) > 1
    assert unet["down_block_types"][0] == "DownBlock2D"


def test_sdxl_architecture_covers_both_text_encoders_and_names_the_family(
    sdxl_dir: Path, tmp_path: Path
) -> None:
    base = load_base_model(str(sdxl_dir), tmp_path, device="cpu", dtype="fp32")
    assert type(base.pipe).__name__ == "StableDiffusionXLPipeline"
    assert base.family.name == "sdxl" and base.native_size == 32
    modules = base.architecture.modules
    assert {name.split(".", 1)[0] for name in modules} == {"unet", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2.text_projection" in modules
    # the id includes the family: the same modules under another family name give another id
    same_modules = Architecture(modules, family="sd1")
    assert same_modules.architecture_id != base.architecture.architecture_id
    # registration computes the identity from configs on the meta device: the same descriptor
    meta = BaseIdentity.from_spec(str(sdxl_dir), tmp_path)
    assert meta.architecture == base.architecture and meta.family == "sdxl"


def test_sd1_architecture_ids_are_unchanged(base_model: Any) -> None:
    """SD1.x ids predate families (module shapes only), so adapters registered before still open."""
    arch = base_model.architecture
    assert arch.family == "sd1"
    legacy = hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in arch.modules.items())).encode())
    assert arch.architecture_id == legacy.hexdigest()


def test_cli_builds_tiny_sdxl_random_and_reports_its_family(
    sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    output = tmp_path / "xl"
    assert main(["model", "init-tiny", "--random", "--family", "sdxl", "--output", str(output)]) == 0
    assert tree_digest(output) == tree_digest(sdxl_dir)
    capsys.readouterr()
    assert main(["model", "info", "--base-model", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["family"], summary["pipeline"], summary["native_size"]) == (
        "sdxl",
        "StableDiffusionXLPipeline",
        32,
    )
    assert main(["model", "init-tiny", "--family", "sdxl", "--output", str(tmp_path / "no")]) == 2
    assert "needs --random" in capsys.readouterr().err


def build_tiny_sd2(output: Path) -> Path:
    """An SD2.x-shaped folder: StableDiffusionPipeline, 1024-wide context (the SD2 signal), linear
    projections, a GELU text encoder and a v-prediction DDIM scheduler, as SD2.1 768-v."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from basemodel.tiny import SD15_SCHEDULER, assemble_pipeline, build_vae, clip_text_config
    from basemodel.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    config = clip_text_config(
        tokenizer, hidden_size=1024, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8
    )
    config.hidden_act = "gelu"
    scheduler = DDIMScheduler(**{**SD15_SCHEDULER, "prediction_type": "v_prediction"})
    pipe = assemble_pipeline(build_vae(1), CLIPTextModel(config), tokenizer, unet, scheduler=scheduler)
    pipe.save_pretrained(output, safe_serialization=True)
    return output


def test_sd2_folder_loads_as_sd2_and_samples_with_v_prediction(tmp_path: Path) -> None:
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from service.engine.sampler import SampleParams, StageTimer, generators_for, sample
    from service.engine.schedulers import make_scheduler

    folder = build_tiny_sd2(tmp_path / "tiny-sd2")
    base = load_base_model(str(folder), tmp_path, device="cpu", dtype="fp32")
    assert (base.family.name, type(base.pipe).__name__) == ("sd2", "StableDiffusionPipeline")
    assert base.family.prediction_type(base.pipe.scheduler.config) == "v_prediction"
    identity = BaseIdentity.from_spec(str(folder), tmp_path)
    assert base.architecture.architecture_id == identity.architecture_id
    assert identity.prediction_type == BaseIdentity.from_base_model(base).prediction_type == "v_prediction"
    params = SampleParams("a red circle", "", 3, 5.0, 32, 32, 4, 1, "euler")
    ours = np.asarray(sample(base.pipe, params, StageTimer())[0], dtype=np.int16)

    def reference(prediction_type: str) -> Any:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler(
            "euler", {**pipe.scheduler.config, "prediction_type": prediction_type}
        )
        image = pipe(
            "a red circle", num_inference_steps=3, guidance_scale=5.0, generator=generators_for(4, 1)
        ).images[0]
        return np.asarray(image, dtype=np.int16)

    assert np.abs(ours - reference("v_prediction")).max() <= 1
    assert np.abs(ours - reference("epsilon")).max() > 10, "v-prediction must matter for this model"
