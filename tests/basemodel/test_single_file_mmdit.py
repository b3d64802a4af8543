"""Single-file SD3/SD3.5 and Flux.1 checkpoints: SAI's, BFL's and ComfyUI's layouts in, an offline
pipeline out, completed from a diffusers folder (``--base-components``) like
``from_pretrained(folder, transformer=…)``.

The released models cannot be downloaded here, so the tiny random models are written in those layouts
(``to_single_file``: the inverse of diffusers' converters) and loaded back; the shipped configs and the
full-width conversion are checked on PyTorch's meta device.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import save_file

from basemodel.errors import BaseModelError, MissingComponents
from basemodel.families import detect_checkpoint
from basemodel.families.flux import single_file as flux_file
from basemodel.families.flux.export import transformer_to_bfl
from basemodel.families.flux.tiny import build_tiny_flux_pipeline
from basemodel.families.sd3 import single_file as sd3_file
from basemodel.families.sd3.export import transformer_to_sai
from basemodel.families.sd3.tiny import build_tiny_sd3_pipeline
from basemodel.loader import load_base_model
from basemodel.settings import load_settings
from basemodel.single_file import load_single_file
from basemodel.single_file_mmdit import read_header
from basemodel.single_file_parts import CONFIGS_DIR

PROMPT = "a red circle"


def _generate(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np"
    ).images


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("single-file loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    yield


def _tiny_sd3(**kwargs: Any) -> Any:
    """tiny-sd3-random with SD3's identity CLIP-L projection (SD3 pools CLIP-L unprojected; SAI's files
    carry no CLIP-L projection and diffusers' converter sets the identity)."""
    pipe = build_tiny_sd3_pipeline(**kwargs)
    weight = pipe.text_encoder.text_projection.weight
    weight.data = torch.eye(*weight.shape)
    return pipe


class Model:
    """A tiny pipeline, its diffusers folder, and files in the single-file layouts."""

    def __init__(self, pipe: Any, folder: Path) -> None:
        self.pipe, self.folder = pipe, folder
        self.files: dict[str, Path] = {}

    def write(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        path = self.folder.parent / f"{name}.safetensors"
        save_file(state, str(path))
        self.files[name] = path
        return path


def _model(root: Path, pipe: Any, to_file: Any) -> Model:
    model = Model(pipe, root / "diffusers")
    pipe.save_pretrained(model.folder, safe_serialization=True)
    model.write("transformer-only", to_file(pipe, all_in_one=False))
    model.write("all-in-one", to_file(pipe))
    return model


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return _model(tmp_path_factory.mktemp("flux-file"), build_tiny_flux_pipeline(), flux_file.to_single_file)


@pytest.fixture(scope="module")
def flux_other_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another Flux folder (other weights) without the transformer's weights: components from it must
    not replace the file's, and it needs no transformer."""
    folder = tmp_path_factory.mktemp("flux-seed1") / "diffusers"
    build_tiny_flux_pipeline(seed=1).save_pretrained(folder, safe_serialization=True)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return _model(tmp_path_factory.mktemp("sd3-file"), _tiny_sd3(), sd3_file.to_single_file)


# --- layouts and detection --------------------------------------------------------------------------------


def test_files_have_the_released_key_names_and_are_detected_from_keys(flux: Model, sd3: Model) -> None:
    bfl = read_header(flux.files["transformer-only"])
    for key in (  # as in flux1-dev.safetensors
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.txt_mlp.2.bias",
        "single_blocks.0.linear1.weight",
        "single_blocks.0.norm.key_norm.scale",
        "img_in.weight",
        "time_in.in_layer.weight",
        "vector_in.out_layer.bias",
        "guidance_in.in_layer.weight",
        "txt_in.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert key in bfl, key
    comfy = read_header(flux.files["all-in-one"])
    for key in (
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
        "vae.decoder.conv_in.weight",
    ):
        assert key in comfy, key
    sai = read_header(sd3.files["all-in-one"])
    for key in (  # as in sd3.5_medium.safetensors
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
        "model.diffusion_model.joint_blocks.0.context_block.attn.ln_q.weight",
        "model.diffusion_model.pos_embed",
        "model.diffusion_model.y_embedder.mlp.0.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
    ):
        assert key in sai, key
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in sai  # SD3: CLIP-L unprojected
    names = {n: detect_checkpoint(read_header(p)).name for n, p in flux.files.items()}  # type: ignore[union-attr]
    assert names == {"transformer-only": "flux", "all-in-one": "flux"}
    assert detect_checkpoint(sai).name == "sd3"  # type: ignore[union-attr]
    assert (flux_file.variant(bfl), sd3_file.variant(sai)) == ("dev", "sd3.5-medium")


def _meta_flux(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    with init_empty_weights(include_buffers=True):
        return dict(FluxTransformer2DModel.from_config(config).state_dict())


def _meta_sd3(config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    with init_empty_weights(include_buffers=True):
        model = SD3Transformer2DModel.from_config(config)
    return dict(model.state_dict()), model.config


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


@pytest.mark.parametrize("name", ["flux1-dev", "flux1-schnell"])
def test_shipped_flux_configs_convert_at_full_width(name: str) -> None:
    """The released widths go through diffusers' converter unchanged (3072: its own split of linear1)."""
    config = json.loads((CONFIGS_DIR / name / "transformer" / "config.json").read_text())
    state = _meta_flux(config)
    assert sum(t.numel() for t in state.values()) == (
        11_901_408_320 if name == "flux1-dev" else 11_891_178_560
    )
    bfl = transformer_to_bfl(state)
    assert bfl["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert flux_file.variant(_shapes(bfl)) == name.removeprefix("flux1-")
    assert _shapes(flux_file.convert(dict(bfl), config)) == _shapes(state)


@pytest.mark.parametrize(
    ("name", "variant", "size"),
    [
        ("sd3-medium", "sd3-medium", 2_028_328_000),
        ("sd35-medium", "sd3.5-medium", 2_243_171_520),
        ("sd35-large", "sd3.5-large", 8_056_627_520),
    ],
)
def test_shipped_sd3_configs_are_told_apart_and_convert(name: str, variant: str, size: int) -> None:
    config = json.loads((CONFIGS_DIR / name / "transformer" / "config.json").read_text())
    state, full = _meta_sd3(config)
    assert sum(t.numel() for t in state.values() if t is not state["pos_embed.pos_embed"]) == size
    sai = {f"model.diffusion_model.{k}": v for k, v in transformer_to_sai(state, full).items()}
    assert sd3_file.variant(_shapes(sai)) == variant
    assert detect_checkpoint(sai).name == "sd3"  # type: ignore[union-attr]
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in sai.items()}
    assert _shapes(sd3_file.convert(bare, config)) == _shapes(state)


# --- loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["transformer-only", "all-in-one"])
def test_flux_file_with_components_draws_what_the_folder_draws(
    flux: Model, flux_other_seed: Path, layout: str, offline: None
) -> None:
    """BFL's bare transformer and ComfyUI's all-in-one file: every weight in the file is the file's
    (the all-in-one file is completed from a folder with other weights: only its T5 tokenizer is used).
    ComfyUI writes a ``text_projection`` for every CLIP; Flux's CLIP-L has none, so it is left out."""
    components = flux.folder if layout == "transformer-only" else flux_other_seed
    path = flux.files[layout]
    if layout == "all-in-one":
        from safetensors.torch import load_file

        state = load_file(str(path))
        state["text_encoders.clip_l.transformer.text_projection.weight"] = torch.eye(32)
        path = path.with_name("comfy-all-in-one.safetensors")
        save_file(state, str(path))
    pipe = load_single_file(path, torch.float32, components=components)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(pipe, name), getattr(flux.pipe, name))
    assert (_generate(pipe) == _generate(flux.pipe)).all()


@pytest.mark.parametrize("sd35", [True, False], ids=["sd3.5", "sd3"])
def test_sd3_files_draw_what_the_folder_draws(sd3: Model, sd35: bool, tmp_path: Path, offline: None) -> None:
    # sd3: SD3 medium's transformer (no dual attention, no QK norm)
    model = sd3 if sd35 else _model(tmp_path, _tiny_sd3(sd35=False), sd3_file.to_single_file)
    assert sd3_file.variant(read_header(model.files["all-in-one"])) == (
        "sd3.5-medium" if sd35 else "sd3-medium"
    )
    for layout in ("transformer-only", "all-in-one"):
        pipe = load_single_file(model.files[layout], torch.float32, components=model.folder)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            _assert_same_weights(getattr(pipe, name), getattr(model.pipe, name))
        assert (_generate(pipe) == _generate(model.pipe)).all(), layout


def test_flux_schnell_is_told_from_dev_by_its_keys(flux: Model, tmp_path: Path) -> None:
    """No ``guidance_in``: schnell's transformer (no guidance embedding) and schnell's scheduler, even with
    a dev folder as the components."""
    schnell = build_tiny_flux_pipeline(schnell=True)
    path = tmp_path / "flux1-dev.safetensors"  # the name says dev; the keys say schnell
    save_file(flux_file.to_single_file(schnell, all_in_one=False), str(path))
    assert detect_checkpoint(read_header(path)).name == "flux"  # type: ignore[union-attr]
    assert flux_file.variant(read_header(path)) == "schnell"
    pipe = load_single_file(path, torch.float32, components=flux.folder)
    assert pipe.transformer.config.guidance_embeds is False
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (1.0, False)
    _assert_same_weights(pipe.transformer, schnell.transformer)
    assert (_generate(pipe) == _generate(schnell)).all()


def test_the_same_weights_as_a_file_and_as_a_folder_have_one_architecture_id(
    flux: Model, sd3: Model, tmp_path: Path
) -> None:
    """Adapters registered against the diffusers folder serve on the single file and back."""
    for model in (flux, sd3):
        folder = load_base_model(str(model.folder), tmp_path, device="cpu", dtype="fp32")
        single = load_base_model(
            str(model.files["transformer-only"]),
            tmp_path,
            device="cpu",
            dtype="fp32",
            components=model.folder,
        )
        assert single.ref.kind == "single_file"
        assert single.family is folder.family
        assert single.architecture.architecture_id == folder.architecture.architecture_id
        assert single.architecture.unet_config == folder.architecture.unet_config


def test_sd3_with_clips_but_no_t5_loads_without_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    """SAI's ``sd3_medium_incl_clips``: transformer, VAE and both CLIPs, no T5 → text_encoder_3=None
    (diffusers' no-T5 mode) from the shipped configs alone. The shipped configs are swapped for the tiny
    model's so that the tiny weights fit them."""
    from basemodel import single_file_mmdit

    pipe = _tiny_sd3(t5=False)
    configs = tmp_path / "configs"
    pipe.save_pretrained(configs / "sd35-medium", safe_serialization=True)
    for weights in (configs / "sd35-medium").rglob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(single_file_mmdit, "CONFIGS_DIR", configs)
    path = tmp_path / "sd3.5_medium_incl_clips.safetensors"
    save_file(sd3_file.to_single_file(pipe), str(path))
    loaded = load_single_file(path, torch.float32)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(loaded, name), getattr(pipe, name))
    assert (_generate(loaded) == _generate(pipe)).all()


# --- what is missing, wrong or broken ---------------------------------------------------------------------


def test_a_file_without_its_components_names_them_and_the_flag(flux: Model, sd3: Model) -> None:
    cases = [
        (flux.files["transformer-only"], ["vae", "text_encoder", "text_encoder_2", "tokenizer_2"]),
        (flux.files["all-in-one"], ["tokenizer_2"]),  # T5's vocabulary is in no checkpoint
        (sd3.files["transformer-only"], ["text_encoder", "text_encoder_2"]),  # T5 may be left out
        (sd3.files["all-in-one"], ["tokenizer_3"]),  # T5's weights without its vocabulary
    ]
    for path, missing in cases:
        with pytest.raises(MissingComponents) as caught:
            load_single_file(path, torch.float32)
        assert caught.value.type == "base_model_components_missing"
        assert caught.value.detail["missing"] == missing, path.name
        assert "--base-components" in caught.value.hint and "LORASWAP_BASE_COMPONENTS" in caught.value.hint


def _without(source: Path, target: Path, drop: str) -> Path:
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(source)).items() if not k.endswith(drop)}
    save_file(state, str(target))
    return target


def test_broken_and_foreign_files_are_typed_errors(flux: Model, sd3: Model, tmp_path: Path) -> None:
    bfl = flux.files["transformer-only"]
    broken = _without(bfl, tmp_path / "broken.safetensors", "final_layer.linear.weight")
    with pytest.raises(
        BaseModelError, match=r"Flux.1-dev transformer weights cannot be converted: .*final_layer"
    ):
        load_single_file(broken, torch.float32, components=flux.folder)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(bfl.read_bytes()[: bfl.stat().st_size // 2])
    with pytest.raises(BaseModelError, match=r"not a readable \.safetensors"):
        load_single_file(cut, torch.float32, components=flux.folder)
    marker = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8)}
    for extra, found in (
        ({"single_stream_modulation.lin.weight": torch.zeros(4, 4)}, "Flux.2"),
        ({"img_in.weight": torch.zeros(3072, 384)}, "Fill"),
        ({"scaled_fp8": torch.zeros(0)}, "scaled-fp8"),
    ):
        path = tmp_path / "other.safetensors"
        save_file(marker | extra, str(path))
        with pytest.raises(BaseModelError, match=found):
            load_single_file(path, torch.float32, components=flux.folder)
    with pytest.raises(BaseModelError, match=r"holds a SD3/SD3.5 model; the checkpoint is Flux.1-dev"):
        load_single_file(bfl, torch.float32, components=sd3.folder)
    with pytest.raises(BaseModelError, match="not a diffusers folder"):
        load_single_file(bfl, torch.float32, components=tmp_path)
    half = _without(sd3.files["transformer-only"], tmp_path / "half.safetensors", "context_embedder.weight")
    with pytest.raises(BaseModelError, match=r"SD3\.5 medium transformer weights cannot be converted"):
        load_single_file(half, torch.float32, components=sd3.folder)


def test_a_transformer_of_another_size_needs_its_config(flux: Model, tmp_path: Path) -> None:
    """Neither the folder's transformer config (here: a deeper model) nor the shipped Flux.1 config
    describes the file's transformer: the error says which configs were tried and what to do."""
    folder = tmp_path / "other-transformer-config"
    shutil.copytree(flux.folder, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
    with pytest.raises(BaseModelError, match=r"do not match the model config") as caught:
        load_single_file(flux.files["all-in-one"], torch.float32, components=folder)
    assert "flux1-dev/transformer" in caught.value.hint and "--base-components" in caught.value.hint
    assert str(folder / "transformer" / "config.json") in caught.value.hint


def test_the_flag_and_the_setting(
    flux: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``LORASWAP_BASE_COMPONENTS`` and ``loraswap model info --base-components`` (the CLI in-process)."""
    from service.cli import main

    monkeypatch.setenv("LORASWAP_BASE_COMPONENTS", str(flux.folder))
    assert load_settings().base_components == flux.folder
    monkeypatch.setenv("LORASWAP_BASE_COMPONENTS", " ")
    assert load_settings().base_components is None
    monkeypatch.delenv("LORASWAP_BASE_COMPONENTS")
    monkeypatch.setenv("LORASWAP_HOME", str(tmp_path / "home"))
    info = ["model", "info", "--base-model", str(flux.files["transformer-only"])]
    assert main([*info, "--base-components", str(flux.folder)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["family"], summary["kind"], summary["pipeline"]) == (
        "flux",
        "single_file",
        "FluxPipeline",
    )
    assert main(info) == 2
    error = capsys.readouterr().err
    assert "error[base_model_components_missing]" in error and "--base-components" in error


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_merge_writes_single_files_that_load_back(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``adapters merge --format single-file`` on Flux (ComfyUI's all-in-one layout) and SD3 (SAI's): the
    file loads back (with the folder for T5's tokenizer) to exactly what the diffusers-folder merge holds."""
    from adapters.identity import BaseIdentity
    from adapters.merge import MergeItem, merge_adapters
    from adapters.registry import Registry
    from adapters.sources import open_store
    from tests.adapters.conftest import save_bytes

    model: Model = request.getfixturevalue(family)

    def base() -> Any:  # merging changes the model it is given
        return load_base_model(str(model.folder), tmp_path, device="cpu", dtype="fp32")

    first = base()
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(first))
    torch.manual_seed(3)
    module = "transformer.transformer_blocks.0.attn.to_q"
    lora = {f"{module}.lora_A.weight": torch.randn(2, 16), f"{module}.lora_B.weight": torch.randn(16, 2)}
    registry.register(save_bytes(lora), "style")
    merge_adapters(registry, first, [MergeItem("style")], tmp_path / "m", dtype="fp32", progress=False)
    single = tmp_path / "m.safetensors"
    merge_adapters(
        registry, base(), [MergeItem("style")], single, fmt="single-file", dtype="fp32", progress=False
    )
    assert detect_checkpoint(read_header(single)).name == family  # type: ignore[union-attr]
    folder = load_base_model(str(tmp_path / "m"), tmp_path, device="cpu", dtype="fp32")
    loaded = load_single_file(single, torch.float32, components=model.folder)
    encoders = [
        name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(loaded, name)
    ]
    for name in ("transformer", "vae", *encoders):
        _assert_same_weights(getattr(loaded, name), getattr(folder.pipe, name))
    changed = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(
        loaded.transformer.state_dict()[changed], model.pipe.transformer.state_dict()[changed]
    )


def test_an_fp8_flux_file_loads_at_the_requested_dtype(flux: Model, tmp_path: Path) -> None:
    """ComfyUI's (unscaled) fp8 checkpoints: every weight float8_e4m3fn, loaded as bf16 to the same
    values as the fp8 weights cast by hand."""
    fp8 = {
        k: v.to(torch.float8_e4m3fn) for k, v in flux_file.to_single_file(flux.pipe, all_in_one=False).items()
    }
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(fp8, str(path))
    pipe = load_single_file(path, torch.bfloat16, components=flux.folder)
    got, want = pipe.transformer.state_dict(), flux.pipe.transformer.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], tensor.to(torch.float8_e4m3fn).to(torch.bfloat16)), key
