"""SDXL through the real server (tiny-sdxl-random, fp32, CPU): parity with plain diffusers'
``StableDiffusionXLPipeline`` (with ``load_lora_weights`` + ``set_adapters``), mixed batches, and
adapters of another family refused with 409 naming both families."""

from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from adapters.errors import AdapterIncompatible
from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from adapters.kohya_ldm import kohya_unet_names
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel import single_file
from basemodel.loader import BaseModel, load_base_model
from service.cli import main
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.adapters.sgm_factory import random_kohya
from tests.basemodel.test_single_file_sdxl import sdxl_to_sgm
from tests.service.test_hotswap import pixels
from tests.service.test_lifecycle import metric_samples, value

REQUEST = {"prompt": "a red circle", "steps": 4, "guidance_scale": 6.0, "seed": 5, "scheduler": "euler"}
TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
    "text_encoder": ["q_proj", "v_proj", "fc1"],
    "text_encoder_2": ["q_proj", "v_proj", "fc1"],
}


@pytest.fixture(scope="module")
def sdxl(loraswap_home: Path) -> BaseModel:
    return load_base_model("tiny-sdxl-random", loraswap_home / "models", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def sdxl_files(sdxl: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """diffusers/PEFT-layout SDXL LoRAs: on UNet (incl. LoCon) + both text encoders, on text_encoder_2
    alone, and a second full one with other weights."""
    folder = tmp_path_factory.mktemp("sdxl-loras")
    torch.manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for component, targets in TARGETS.items():
        model = copy.deepcopy(sdxl.lora_components[component])
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(config, model)
        tensors |= {f"{component}.{k}": v.detach() for k, v in get_peft_model_state_dict(model).items()}
    files = {
        "full": tensors,
        "te2": {k: v for k, v in tensors.items() if k.startswith("text_encoder_2.")},
        "other": {k: (-0.7 * v if ".lora_B." in k else v) for k, v in tensors.items()},
    }
    for name, content in files.items():
        (folder / f"{name}.safetensors").write_bytes(save_bytes(content))
    return {name: folder / f"{name}.safetensors" for name in files}


@pytest.fixture(scope="module")
def kohya_files(sdxl: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sd-scripts-style SDXL files, every UNet module under its SGM name (``lora_unet_input_blocks_…``,
    ``middle_block_…``, ``output_blocks_…``, ``label_emb_…``): ``full`` with ``lora_te1_``/``lora_te2_``
    MLP keys (diffusers 0.42 ignores kohya text-encoder *attention* keys, docs/adapters.md), ``te``
    its text-encoder part alone, and ``attention`` with the text encoders' attention keys as well."""
    folder = tmp_path_factory.mktemp("sdxl-kohya")

    def kohya(text_targets: Any) -> dict[str, torch.Tensor]:
        config = sdxl.pipe.unet.config
        return random_kohya(sdxl.architecture, config, text_targets, te1_prefix="lora_te1_")[0]

    full = kohya(lambda path: ".mlp." in path)
    files = {
        "full": full,
        "te": {k: v for k, v in full.items() if k.startswith(("lora_te1_", "lora_te2_"))},
        "attention": kohya(lambda path: ".mlp." in path or ".self_attn." in path),
    }
    for name, content in files.items():
        (folder / f"{name}.safetensors").write_bytes(save_bytes(content))
    return {name: folder / f"{name}.safetensors" for name in files}


@pytest.fixture
def xl_registry(sdxl: BaseModel, tmp_path: Path) -> Registry:
    return Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(sdxl))


def generate(server: Any, **overrides: Any) -> httpx.Response:
    with server.client() as http:
        return http.post("/v1/generate", json={**REQUEST, **overrides})


def images(server: Any, **overrides: Any) -> list[np.ndarray]:
    response = generate(server, **overrides)
    assert response.status_code == 200, response.text
    return [pixels(image) for image in response.json()["images"]]


def diffusers_reference(
    model_dir: Path,
    files: list[tuple[Path, float]] = (),
    **overrides: Any,  # type: ignore[assignment]
) -> list[np.ndarray]:
    """The same request in plain diffusers: StableDiffusionXLPipeline, load_lora_weights + set_adapters,
    no negative prompt when it is empty (force_zeros_for_empty_prompt), default width and height."""
    request = {"num_images": 1, "negative_prompt": "", **REQUEST, **overrides}
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for index, (path, _) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
    if files:
        pipe.set_adapters([f"a{i}" for i in range(len(files))], [weight for _, weight in files])
    pipe.scheduler = make_scheduler(request["scheduler"], pipe.scheduler.config)
    result = pipe(
        request["prompt"],
        width=request.get("width"),
        height=request.get("height"),
        negative_prompt=request["negative_prompt"] or None,
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        num_images_per_prompt=request["num_images"],
        generator=generators_for(request["seed"], request["num_images"]),
        output_type="pil",
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def max_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    assert len(ours) == len(theirs)
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize(
    "request_",
    [
        {"num_images": 2},  # empty negative prompt: zero embeddings; Euler (set_begin_index)
        {"negative_prompt": "blurry", "scheduler": "ddim", "guidance_scale": 4.0, "width": 48, "height": 32},
    ],
    ids=["zero-negative-euler", "negative-ddim-48x32"],
)
def test_sdxl_without_adapters_matches_diffusers(
    start_server: Any, sdxl: BaseModel, request_: dict[str, Any]
) -> None:
    server = start_server(loader=lambda _: sdxl)
    response = generate(server, **request_)
    assert response.status_code == 200, response.text
    body = response.json()
    size = (request_.get("width", 32), request_.get("height", 32))  # default: the model's native size
    assert [(i["width"], i["height"]) for i in body["images"]] == [size] * len(body["images"])
    assert body["parameters"]["model"] == "tiny-sdxl-random"
    ours = [pixels(image) for image in body["images"]]
    assert ours[0].shape == (size[1], size[0], 3)
    assert max_diff(ours, diffusers_reference(sdxl.ref.path, **request_)) <= 1


def test_sdxl_adapters_match_load_lora_weights(
    start_server: Any, sdxl: BaseModel, xl_registry: Registry, sdxl_files: dict[str, Path]
) -> None:
    for name, path in sdxl_files.items():
        xl_registry.register(path, name)
    server = start_server(loader=lambda _: sdxl, store=xl_registry.store.uri)
    plain = images(server)
    full = images(server, adapters=[{"id": "full", "scale": 0.7}])
    assert max_diff(full, diffusers_reference(sdxl.ref.path, [(sdxl_files["full"], 0.7)])) <= 1
    assert max_diff(full, plain) > 10, "the adapter must visibly change the image"
    # text_encoder_2 is hooked: an adapter on it alone changes the image, exactly as in diffusers
    second = images(server, adapters=[{"id": "te2", "scale": 1.0}])
    assert max_diff(second, diffusers_reference(sdxl.ref.path, [(sdxl_files["te2"], 1.0)])) <= 1
    assert max_diff(second, plain) > 3, "a text_encoder_2 adapter must change the image"
    both = images(server, prompt="a star <lora:full:0.5> <lora:other:0.4>")
    files = [(sdxl_files["full"], 0.5), (sdxl_files["other"], 0.4)]
    assert max_diff(both, diffusers_reference(sdxl.ref.path, files, prompt="a star")) <= 1


def test_sdxl_mixed_batch_rows_equal_requests_alone(
    start_server: Any, sdxl: BaseModel, xl_registry: Registry, sdxl_files: dict[str, Path]
) -> None:
    xl_registry.register(sdxl_files["full"], "full")
    xl_registry.register(sdxl_files["other"], "other")
    requests = [
        {"prompt": "a red circle", "seed": 1, "adapters": [{"id": "full", "scale": 0.8}]},
        {"prompt": "a blue square", "seed": 2, "negative_prompt": "dark", "adapters": [{"id": "other"}]},
        {"prompt": "a green star", "seed": 3, "num_images": 2, "guidance_scale": 3.0},
    ]
    alone_server = start_server(loader=lambda _: sdxl, store=xl_registry.store.uri, max_batch_size=1)
    alone = [images(alone_server, **r) for r in requests]
    alone_server.stop()
    server = start_server(
        loader=lambda _: sdxl, store=xl_registry.store.uri, max_batch_size=4, batch_window_ms=1500
    )
    for r in requests:  # make every adapter resident, so the batch is not split by cold loads
        images(server, **{**r, "steps": 1})
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        batched = list(pool.map(lambda r: images(server, **r), requests))
    samples = metric_samples(server)
    batch_counts = {s.labels["le"]: s.value for s in samples["loraswap_batch_size_bucket"]}
    assert batch_counts["1.0"] < value(samples, "loraswap_batch_size_count"), "no request was batched"
    for one, many in zip(alone, batched, strict=True):
        assert max_diff(one, many) <= 2


def test_sdxl_kohya_sgm_file_matches_load_lora_weights(
    start_server: Any, sdxl: BaseModel, xl_registry: Registry, kohya_files: dict[str, Path]
) -> None:
    """A kohya SDXL file (SGM UNet names + lora_te1_/lora_te2_) registers on tiny-sdxl-random and serves
    like diffusers' load_lora_weights + set_adapters loading the same file."""
    for name in ("full", "te"):
        assert xl_registry.register(kohya_files[name], f"kohya-{name}").source_format == "kohya"
    assert xl_registry.resolve("kohya-full").components == ["text_encoder", "text_encoder_2", "unet"]
    assert xl_registry.resolve("kohya-te").components == ["text_encoder", "text_encoder_2"]
    server = start_server(loader=lambda _: sdxl, store=xl_registry.store.uri)
    plain = images(server)
    ours = images(server, adapters=[{"id": "kohya-full", "scale": 0.8}])
    assert max_diff(ours, diffusers_reference(sdxl.ref.path, [(kohya_files["full"], 0.8)])) <= 1
    assert max_diff(ours, plain) > 10, "the adapter must visibly change the image"
    text = images(server, prompt="a red circle <lora:kohya-te:1.0>")
    assert max_diff(text, diffusers_reference(sdxl.ref.path, [(kohya_files["te"], 1.0)])) <= 1
    assert max_diff(text, plain) > 3, "lora_te1_/lora_te2_ keys must change the image"


def test_sdxl_convert_both_ways_and_diffusers_loads_the_results(
    start_server: Any,
    sdxl: BaseModel,
    xl_registry: Registry,
    kohya_files: dict[str, Path],
    loraswap_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``loraswap adapters convert`` of an sd-scripts SDXL file (text-encoder attention and MLP) to
    diffusers, that to kohya, and back: the kohya export has sd-scripts' SDXL names and converts back to
    the same tensors; StableDiffusionXLPipeline draws the diffusers file exactly as loraswap serves the
    original, and the kohya export exactly as it draws the original (both without the text-encoder
    attention keys it drops from kohya files)."""
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")
    source = kohya_files["attention"]
    outputs = {layout: tmp_path / f"{layout}.safetensors" for layout in ("diffusers", "kohya", "again")}

    def convert(path: Path, layout: str, output: Path) -> dict[str, torch.Tensor]:
        argv = ["adapters", "convert", str(path), "--to", layout, "-o", str(output)]
        assert main([*argv, "--base-model", "tiny-sdxl-random"]) == 0, capsys.readouterr().err
        tensors, header = read_adapter(output)
        assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert header["ss_base_model_version"] == "sdxl_base_v1-0"
        return tensors

    canonical = convert(source, "diffusers", outputs["diffusers"])
    assert {k.split(".", 1)[0] for k in canonical} == {"unet", "text_encoder", "text_encoder_2"}
    exported = convert(outputs["diffusers"], "kohya", outputs["kohya"])
    assert {k.split("_", 2)[1] for k in exported} == {"unet", "te1", "te2"}
    unet_names = {k.split(".")[0].removeprefix("lora_unet_") for k in exported if k.startswith("lora_unet_")}
    assert unet_names == set(kohya_unet_names(sdxl.pipe.unet.config))  # SGM names, every module
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_") for k in exported)
    again = convert(outputs["kohya"], "diffusers", outputs["again"])
    assert again.keys() == canonical.keys()
    for key, tensor in canonical.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-6, atol=1e-7, msg=key)

    xl_registry.register(source, "sd-scripts")
    server = start_server(loader=lambda _: sdxl, store=xl_registry.store.uri)
    ours = images(server, adapters=[{"id": "sd-scripts", "scale": 0.8}])
    assert max_diff(diffusers_reference(sdxl.ref.path, [(outputs["diffusers"], 0.8)]), ours) <= 1
    original = diffusers_reference(sdxl.ref.path, [(source, 0.8)])
    assert max_diff(diffusers_reference(sdxl.ref.path, [(outputs["kohya"], 0.8)]), original) <= 1


def test_sdxl_single_file_base_serves_kohya_and_diffusers_adapters(
    start_server: Any,
    sdxl: BaseModel,
    kohya_files: dict[str, Path],
    sdxl_files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--base-model model.safetensors`` with tiny-sdxl-random in the SGM layout (A1111/CivitAI): the
    same family and architecture as the folder, and kohya and diffusers adapters serve on it as
    diffusers' SDXL pipeline draws them on the folder. The shipped configs are SDXL base's, so this
    tiny checkpoint's own configs stand in for them."""
    checkpoint = tmp_path / "tiny-sdxl.safetensors"
    save_file(sdxl_to_sgm(sdxl.pipe), str(checkpoint))
    layout = dataclasses.replace(single_file.LAYOUTS["sdxl"], config_dir=sdxl.ref.path)
    monkeypatch.setitem(single_file.LAYOUTS, "sdxl", layout)
    base = load_base_model(str(checkpoint), tmp_path / "models", device="cpu", dtype="fp32")
    assert base.family.name == "sdxl" and base.ref.kind == "single_file"
    assert base.architecture.architecture_id == sdxl.architecture.architecture_id
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(base))
    registry.register(kohya_files["full"], "kohya")
    registry.register(sdxl_files["full"], "peft")
    server = start_server(loader=lambda _: base, store=registry.store.uri)
    kohya = images(server, adapters=[{"id": "kohya", "scale": 0.8}])
    assert max_diff(kohya, diffusers_reference(sdxl.ref.path, [(kohya_files["full"], 0.8)])) <= 1
    peft = images(server, prompt="a star <lora:peft:0.7>")
    assert (
        max_diff(peft, diffusers_reference(sdxl.ref.path, [(sdxl_files["full"], 0.7)], prompt="a star")) <= 1
    )


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 409, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "adapter_incompatible"
    return error


def test_adapters_of_another_family_are_refused_naming_both(
    start_server: Any, base_model: Any, sdxl: BaseModel, sdxl_files: dict[str, Path], tmp_path: Path
) -> None:
    store = open_store(str(tmp_path / "store"))
    sd1_file = save_bytes(diffusers_layout(make_case(base_model.pipe)))
    Registry(store, BaseIdentity.from_base_model(base_model)).register(sd1_file, "sd1-style")
    Registry(store, BaseIdentity.from_base_model(sdxl)).register(sdxl_files["full"], "xl-style")

    xl_server = start_server(loader=lambda _: sdxl, store=store.uri)
    error = _error(generate(xl_server, adapters=[{"id": "sd1-style"}]))
    assert "SD1.x (sd1)" in error["message"] and "SDXL (sdxl)" in error["message"], error
    sd1_server = start_server(store=store.uri)
    error = _error(generate(sd1_server, prompt="a cat <lora:xl-style>"))
    assert "SDXL (sdxl)" in error["message"] and "SD1.x (sd1)" in error["message"], error

    # a file without our metadata that declares its family the way kohya and modelspec do
    declared = save_bytes(diffusers_layout(make_case(base_model.pipe)), {"ss_base_model_version": "sd_v1"})
    with xl_server.client() as http:
        response = http.post(
            "/v1/adapters", files={"file": ("a.safetensors", declared)}, data={"id": "declared"}
        )
    error = _error(response)
    assert error["detail"]["reason"] == "family_mismatch"
    assert "SD1.x (sd1)" in error["message"] and "SDXL (sdxl)" in error["message"], error
    header = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    xl_file = save_bytes(load_file(sdxl_files["full"]), header)
    with pytest.raises(AdapterIncompatible, match=r"SDXL \(sdxl\).*SD1\.x \(sd1\)") as info:
        Registry(store, BaseIdentity.from_base_model(base_model)).register(xl_file, "x")
    assert info.value.reason == "family_mismatch"


def test_sdxl_adapter_files_carry_sdxl_interop_names(
    xl_registry: Registry, sdxl_files: dict[str, Path]
) -> None:
    from safetensors import safe_open

    version = xl_registry.register(sdxl_files["full"], "full")
    path = sdxl_files["full"].with_name("stored.safetensors")
    path.write_bytes(xl_registry.read_blob(version))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        keys = set(handle.keys())
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(key.startswith("text_encoder_2.text_model.") for key in keys)
