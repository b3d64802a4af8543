"""SD3/SD3.5 and Flux.1 as families: tiny random models (byte-identical per seed, tokenizers built in
code), detection from configs only (dev vs schnell, SD3 vs SD3.5), identities from configs on the meta
device, the CLI, and where text encoders run (``LORASWAP_TEXT_ENCODER_DEVICE``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.identity import BaseIdentity
from basemodel.families import detect_folder, detect_pipeline, get_family
from basemodel.families.flux.family import image_ids, pack, unpack
from basemodel.families.flux.tiny import build_tiny_flux_pipeline, save_tiny_flux
from basemodel.families.sd3.tiny import save_tiny_sd3
from basemodel.families.t5 import build_t5_tokenizer
from basemodel.loader import load_base_model
from basemodel.text_encoders import TextEncoderPlacement
from tests.basemodel.test_tiny_and_identity import tree_digest


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-random", seed=0)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3-random", seed=0)


@pytest.mark.parametrize("save", [save_tiny_flux, save_tiny_sd3], ids=["flux", "sd3"])
def test_tiny_transformer_models_are_byte_identical_per_seed(
    save: Any, flux_dir: Path, sd3_dir: Path, tmp_path: Path
) -> None:
    reference = flux_dir if save is save_tiny_flux else sd3_dir
    again, other = save(tmp_path / "again", seed=0), save(tmp_path / "other", seed=1)
    assert tree_digest(again) == tree_digest(reference)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert tree_digest(other)[weights] != tree_digest(reference)[weights]
    assert not list(reference.rglob("*.model")), "no sentencepiece model: the T5 tokenizer is built in code"


def test_flux_folder_is_detected_from_its_configs(flux_dir: Path, tmp_path: Path) -> None:
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    renamed = tmp_path / "stable-diffusion-xl-base"  # the name says SDXL; the configs say Flux
    shutil.copytree(flux_dir, renamed)
    assert detect_folder(renamed).name == "flux"
    flux = get_family("flux")
    schnell = build_tiny_flux_pipeline(schnell=True)
    assert detect_pipeline(schnell) is flux
    assert (flux.variant(schnell), flux.max_sequence_length(schnell)) == ("schnell", 256)
    assert flux.cfg_scale(3.5, 4.0, "") == 1.0 and flux.cfg_scale(3.5, 4.0, "blurry") == 4.0


def test_sd3_folder_is_detected_and_identities_come_from_configs(
    flux_dir: Path, sd3_dir: Path, tmp_path: Path
) -> None:
    assert detect_folder(sd3_dir).name == "sd3"
    config = json.loads((sd3_dir / "transformer" / "config.json").read_text())
    assert config["dual_attention_layers"] == [0] and config["qk_norm"] == "rms_norm"
    assert get_family("sd3").variant(config) == "sd3.5"
    for folder, family in ((sd3_dir, "sd3"), (flux_dir, "flux")):
        base = load_base_model(str(folder), tmp_path / "models", device="cpu", dtype="fp32")
        meta = BaseIdentity.from_spec(str(folder), tmp_path / "models")
        assert meta.architecture == base.architecture and meta.family == family
        assert any(name.startswith("transformer.") for name in base.architecture.modules)
        assert not any(
            name.startswith(("text_encoder_3.", "text_encoder_2.encoder"))
            for name in base.architecture.modules
        )


def test_flux_latents_pack_and_unpack_as_flux_pipeline() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 6)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    assert torch.equal(unpack(packed, 8, 6), latents)
    reference = FluxPipeline._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32)
    assert torch.equal(image_ids(4, 3, torch.device("cpu"), torch.float32), reference)


def test_t5_tokenizer_is_built_offline_and_round_trips(tmp_path: Path) -> None:
    from transformers import T5TokenizerFast

    tokenizer = build_t5_tokenizer()
    ids = tokenizer("a red fox, 42!", padding="max_length", max_length=16).input_ids
    assert ids[-1] == tokenizer.pad_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.eos_token_id in ids
    tokenizer.save_pretrained(tmp_path)
    assert (
        T5TokenizerFast.from_pretrained(tmp_path, local_files_only=True)("a red fox, 42!").input_ids
        == ids[: ids.index(1) + 1]
    )


def test_cli_builds_the_transformer_models(
    flux_dir: Path, sd3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    for family, reference, pipeline in (
        ("flux", flux_dir, "FluxPipeline"),
        ("sd3", sd3_dir, "StableDiffusion3Pipeline"),
    ):
        output = tmp_path / family
        assert main(["model", "init-tiny", "--random", "--family", family, "--output", str(output)]) == 0
        assert tree_digest(output) == tree_digest(reference)
        capsys.readouterr()
        assert main(["model", "info", "--base-model", str(output)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["family"], summary["pipeline"], summary["native_size"]) == (family, pipeline, 32)
        assert summary["prediction_type"] == "flow_prediction"


@pytest.mark.parametrize("mode", ["cuda", "cpu", "offload"])
def test_text_encoder_placement(mode: Any) -> None:
    """On a CPU-only machine every mode places the encoders on the CPU; ``offload`` still moves them
    to the serving device for each encoding and back, and counts the moves."""
    pipe = build_tiny_flux_pipeline()
    flux = get_family("flux")
    placement = TextEncoderPlacement(pipe, flux, mode, torch.device("cpu"))
    assert {id(m) for m in placement.encoders} == {id(pipe.text_encoder), id(pipe.text_encoder_2)}
    with placement.encoding() as device:
        assert device.type == "cpu"
        encoded = flux.encode(
            pipe, "a red fox", "", num_images=1, guidance=False, width=32, height=32, device=device
        )
    assert encoded.cond.hidden.shape == (1, 512, 32)  # dev: max_sequence_length 512
    assert placement.moves == (2 if mode == "offload" else 0)
    assert all(p.device.type == "cpu" for m in placement.encoders for p in m.parameters())


def test_community_lora_hook_runs_before_the_generic_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ModelFamily.community_lora`` (where the families' ``lora_keys.py`` plug in) converts a layout
    the generic readers refuse; its result still goes through the rank limit; None falls through."""
    from adapters.errors import AdapterIncompatible, AdapterInvalid
    from adapters.normalise import NormaliseInfo, normalise

    flux = get_family("flux")
    architecture = flux.architecture(build_tiny_flux_pipeline())
    module = next(m for m in architecture.modules if m.endswith("attn.to_q"))
    out, width = architecture.modules[module]
    canonical = {
        f"{module}.lora_A.weight": torch.zeros(2, width),
        f"{module}.lora_B.weight": torch.zeros(out, 2),
    }
    info = NormaliseInfo("kohya", {module: 2}, {module: 2.0}, "fp32")

    def community(self: Any, tensors: Any, arch: Any) -> Any:
        return (canonical, info) if "double_blocks.0.processor.qkv_lora1.down.weight" in tensors else None

    monkeypatch.setattr(type(flux), "community_lora", community)
    xlabs = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(2, width)}
    assert normalise(xlabs, architecture)[0] is canonical
    with pytest.raises(AdapterInvalid):
        normalise(xlabs, architecture, max_rank=1)
    # None falls through to the family's key tables (adapters.community): XLabs names a second double
    # block, which the tiny model lacks
    with pytest.raises(AdapterIncompatible, match="absent from the base model"):
        normalise({"double_blocks.1.processor.qkv_lora1.down.weight": torch.zeros(2, width)}, architecture)
