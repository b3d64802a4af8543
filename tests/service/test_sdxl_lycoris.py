"""LyCORIS (LoHa, LoKr) and DoRA files on SDXL (tiny-sdxl-random, fp32, CPU) through the real server, in
sd-scripts' SGM names (``lora_unet_input_blocks_4_1_…``, ``lora_te1_``/``lora_te2_``) and PEFT's names,
each within 1/255 of a merged-by-hand reference (the weights computed in the test written into plain
diffusers' ``StableDiffusionXLPipeline``); and ``adapters merge --format single-file`` for SDXL: an SGM
checkpoint that ``--base-model`` and diffusers' ``from_single_file`` (offline, ``config=`` the local
folder) both load, drawing what the server draws with those adapters."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from adapters.identity import BaseIdentity
from adapters.kohya_ldm import kohya_unet_names
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel import single_file
from basemodel.loader import BaseModel, load_base_model
from service.cli import main
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters import dora_factory as df
from tests.adapters import lycoris_factory as lf
from tests.adapters.conftest import save_bytes
from tests.service.parity import weights_written
from tests.service.test_sdxl import REQUEST, images, sdxl  # noqa: F401  (sdxl: a fixture)

TARGETS = [
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # input_blocks_4_1_…
    "unet.down_blocks.1.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv2",  # a 3x3 conv: input_blocks_1_0_out_layers_3
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.up_blocks.0.resnets.0.conv1",
    "text_encoder.encoder.layers.0.mlp.fc1",
    "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj",
]
SCALES = {"hada": 0.8, "kron": -0.7, "dora": 0.8, "dora-peft": 0.6}


def sgm_namer(sdxl: BaseModel) -> Callable[[str], str]:
    """Canonical module → the name sd-scripts writes for SDXL (SGM UNet names, lora_te1_/lora_te2_)."""
    unet = {
        f"unet.{path}": f"lora_unet_{name}" for name, path in kohya_unet_names(sdxl.pipe.unet.config).items()
    }
    prefixes = {"text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}

    def name(module: str) -> str:
        component, path = module.split(".", 1)
        if component == "unet":
            return unet[module]
        return prefixes[component] + path.removeprefix("text_model.").replace(".", "_")

    return name


@dataclasses.dataclass(frozen=True)
class XlFiles:
    files: dict[str, dict[str, torch.Tensor]]  # what is registered
    references: dict[str, Callable[[float], dict[str, torch.Tensor]]]  # weight → module → new weight


@pytest.fixture(scope="module")
def xl_files(sdxl: BaseModel) -> XlFiles:
    shapes = {m: sdxl.architecture.modules[m] for m in TARGETS}
    weights = df.base_weights(sdxl.lora_components, TARGETS)
    sgm = sgm_namer(sdxl)
    renamed = {lf.kohya_name(m): sgm(m) for m in TARGETS}

    def to_sgm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {renamed[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}

    def additive(tensors: dict[str, torch.Tensor]) -> Callable[[float], dict[str, torch.Tensor]]:
        deltas = lf.reference_deltas(tensors, shapes)
        return lambda s: {m: weights[m].double() + s * delta for m, (delta, _) in deltas.items()}

    loha, lokr = lf.loha_file(shapes, tucker=True, targets=TARGETS), lf.lokr_file(shapes, targets=TARGETS)
    dora, peft = df.kohya_dora(weights, sgm, axis="in", seed=4), df.peft_dora(weights, seed=5)
    return XlFiles(
        {"hada": to_sgm(loha), "kron": to_sgm(lokr), "dora": dora, "dora-peft": peft},
        {
            "hada": additive(loha),
            "kron": additive(lokr),
            "dora": lambda s: df.reference_weights(dora, weights, s, sgm),
            "dora-peft": lambda s: df.reference_weights(peft, weights, s),
        },
    )


@cache
def _xl_pipe(model_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: StableDiffusionXLPipeline, **overrides: Any) -> list[np.ndarray]:
    """The server's request in plain diffusers (as ``test_sdxl.diffusers_reference`` runs it)."""
    request = {**REQUEST, **overrides}
    pipe.scheduler = make_scheduler(request["scheduler"], pipe.scheduler.config)
    result = pipe(
        request["prompt"],
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        generator=generators_for(request["seed"], 1),
        output_type="pil",
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def with_weights(model_dir: Path, replaced: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    pipe = _xl_pipe(model_dir)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    with weights_written(components, replaced):
        return draw(pipe)


def max_diff(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    return max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))


@pytest.fixture
def xl_registry(sdxl: BaseModel, tmp_path: Path, xl_files: XlFiles) -> Registry:
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(sdxl))
    for name, tensors in xl_files.files.items():
        version = registry.register(save_bytes(tensors), name)
        assert version.kind == {"hada": "loha", "kron": "lokr"}.get(name, "dora")
        assert version.num_modules == len(TARGETS)
    return registry


def test_sdxl_lycoris_and_dora_files_match_a_merged_by_hand_reference(
    start_server: Any,
    sdxl: BaseModel,
    xl_registry: Registry,
    xl_files: XlFiles,
) -> None:
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in xl_files.files["hada"])
    assert any(k.startswith("lora_te2_") for k in xl_files.files["kron"])
    server = start_server(loader=lambda _: sdxl, store=xl_registry.store.uri)
    base = images(server)
    for name, scale in SCALES.items():
        served = images(server, adapters=[{"id": name, "scale": scale}])
        reference = with_weights(sdxl.ref.path, xl_files.references[name](scale))
        assert max_diff(served, reference) <= 1, name
        assert np.abs(served[0] - base[0]).mean() > 1, f"{name} changes the image"


def test_sdxl_merge_single_file_loads_in_loraswap_and_diffusers(
    start_server: Any,
    sdxl: BaseModel,
    xl_registry: Registry,
    loraswap_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", xl_registry.store.uri)
    adapters = [{"id": "dora", "scale": 0.8}, {"id": "hada", "scale": 0.5}]
    served = images(start_server(loader=lambda _: sdxl, store=xl_registry.store.uri), adapters=adapters)
    single = tmp_path / "merged-xl.safetensors"
    argv = [
        "adapters",
        "merge",
        "dora:0.8",
        "hada:0.5",
        "--base-model",
        "tiny-sdxl-random",
        "--dtype",
        "fp32",
    ]
    assert main([*argv, "--no-progress", "--format", "single-file", "-o", str(single)]) == 0
    with safe_open(str(single), framework="pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
    for key in (  # names as in sd_xl_base_1.0.safetensors
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ):
        assert key in keys, key
    record = json.loads(header["loraswap_merge"])
    assert [(a["ref"], a["kind"]) for a in record["adapters"]] == [("dora@1", "dora"), ("hada@1", "loha")]
    assert header["modelspec.architecture"].startswith("stable-diffusion-xl")

    # diffusers, offline: the folder's configs, no download.
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(sdxl.ref.path), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert max_diff(draw(pipe), served) <= 1
    # loraswap --base-model FILE (the shipped configs are SDXL base's: this tiny model's stand in).
    layout = dataclasses.replace(single_file.LAYOUTS["sdxl"], config_dir=sdxl.ref.path)
    monkeypatch.setitem(single_file.LAYOUTS, "sdxl", layout)
    merged = load_base_model(str(single), tmp_path / "models", device="cpu", dtype="fp32")
    assert (
        merged.family.name == "sdxl"
        and merged.architecture.architecture_id == sdxl.architecture.architecture_id
    )
    assert max_diff(images(start_server(loader=lambda _: merged)), served) <= 1
