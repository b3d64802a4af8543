"""``loraswap adapters merge``: a LoRA and a LoHa baked into tiny-sd, written as a diffusers folder and as
an A1111-layout single file; both give the server's images with those adapters (≤ 1/255), load with
``--base-model PATH`` / plain diffusers, record what was merged, and never appear half-written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from adapters.delta import module_delta
from adapters.identity import BaseIdentity
from adapters.kinds import ROLE_KIND, group
from adapters.merge import MergeItem, merge_adapters, parse_item
from adapters.registry import Registry
from basemodel.errors import ConfigError
from basemodel.loader import load_base_model
from basemodel.single_file import load_single_file
from service.cli import main
from tests.adapters import lycoris_factory as lf
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.parity import draw, prepared, sd_pipeline
from tests.service.test_hotswap import generate, pixels

ADAPTERS = [{"id": "style", "scale": 0.7}, {"id": "hada", "scale": 0.5}]


@pytest.fixture
def env(
    registry: Registry, loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_model: Any
) -> Registry:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")  # the registry's store
    registry.register(save_bytes(diffusers_layout(make_case(base_model.pipe))), "style")
    registry.register(save_bytes(lf.loha_file(dict(base_model.architecture.modules))), "hada")
    return registry


def test_merged_models_give_the_servers_images(
    env: Registry, start_server: Any, loraswap_home: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    served = pixels(generate(start_server(store=env.store.uri), adapters=ADAPTERS)["images"][0])
    folder = tmp_path / "merged"
    argv = ["adapters", "merge", "style:0.7", "hada@1:0.5", "--dtype", "fp32", "--no-progress", "-o"]
    assert main([*argv, str(folder)]) == 0

    record = json.loads((folder / "loraswap_merge.json").read_text())
    base = BaseIdentity.from_spec("tiny-sd", loraswap_home / "models")
    assert record["base_model"]["fingerprint"] == base.fingerprint and record["dtype"] == "fp32"
    assert [(a["ref"], a["scale"], a["kind"]) for a in record["adapters"]] == [
        ("style@1", 0.7, "lora"),
        ("hada@1", 0.5, "loha"),
    ]
    assert [a["sha256"] for a in record["adapters"]] == [env.resolve(r).sha256 for r in ("style", "hada")]
    assert record["created_at"]

    # Plain diffusers, and the server with --base-model PATH (no adapters), give the same images.
    assert np.abs(draw(sd_pipeline(folder)) - served).max() <= 1
    merged = load_base_model(str(folder), loraswap_home / "models", device="cpu", dtype="fp32")
    assert merged.architecture.architecture_id == base.architecture_id
    assert np.abs(pixels(generate(start_server(loader=lambda _: merged))["images"][0]) - served).max() <= 1

    # The single-file (LDM) layout: loads back through the single-file loader, same images.
    single = tmp_path / "merged.safetensors"
    assert main([*argv, str(single), "--format", "single-file"]) == 0
    with safe_open(str(single), framework="pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert json.loads(header["loraswap_merge"])["adapters"] == record["adapters"]
    assert header["modelspec.architecture"] == "stable-diffusion-v1"
    pipe = load_single_file(single, torch.float32, config_dir=tiny_model_dir)
    assert np.abs(draw(prepared(pipe)) - served).max() <= 1


def test_math_is_fp32_and_cast_once(env: Registry, loraswap_home: Path, tmp_path: Path) -> None:
    base = load_base_model("tiny-sd", loraswap_home / "models", device="cpu", dtype="fp32")
    module = lf.TARGETS[0]
    component, path = module.split(".", 1)
    original = base.lora_components[component].get_submodule(path).weight.detach().clone()
    record = merge_adapters(
        env, base, [parse_item("hada:0.5"), MergeItem("style")], tmp_path / "m", progress=False
    )
    assert record["dtype"] == "fp16" and [a["scale"] for a in record["adapters"]] == [0.5, 1.0]
    expected = original.clone()
    for ref, scale in (("hada", 0.5), ("style", 1.0)):
        modules, _ = group(env.open(ref).tensors)
        if module in modules:
            factors = modules[module]
            expected += scale * module_delta(ROLE_KIND[next(iter(factors))], factors, tuple(original.shape))
    with safe_open(
        str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt"
    ) as fh:
        weight = fh.get_tensor(f"{path}.weight")
    assert weight.dtype == torch.float16 and torch.equal(weight, expected.to(torch.float16))


def test_output_is_atomic(
    env: Registry, loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    def base() -> Any:  # merging changes the model it is given: a fresh one each time
        return load_base_model("tiny-sd", loraswap_home / "models", device="cpu", dtype="fp32")

    def first_chunk_then_ctrl_c(state: Any) -> Iterator[bytes]:
        yield b"x" * 10
        raise KeyboardInterrupt

    single = out / "merged.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr("adapters.merge._chunks", first_chunk_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            merge_adapters(env, base(), [MergeItem("hada")], single, fmt="single-file", progress=False)
    assert list(out.iterdir()) == []  # neither the file nor its temporary file

    folder = out / "merged"
    with monkeypatch.context() as patch:
        patch.setattr(AutoencoderKL, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            merge_adapters(env, base(), [MergeItem("hada")], folder, progress=False)
    assert list(out.iterdir()) == []  # no folder, no staging folder

    folder.mkdir()
    with pytest.raises(ConfigError, match="exists"):
        merge_adapters(env, base(), [MergeItem("hada")], folder, progress=False)
    assert main(["adapters", "merge", "nobody:0.5", "-o", str(tmp_path / "x")]) != 0
    assert main(["adapters", "merge", "hada:9", "-o", str(tmp_path / "x")]) != 0
    assert not (tmp_path / "x").exists()


def test_single_file_is_refused_for_a_family_without_a_loadable_layout(env: Registry, tmp_path: Path) -> None:
    """SD2.x: its single files do not load back in loraswap, so none is written (before any work)."""
    from types import SimpleNamespace

    from basemodel.errors import NotSupported
    from basemodel.families import get_family

    sd2 = SimpleNamespace(dtype=torch.float32, family=get_family("sd2"))
    output = tmp_path / "sd2.safetensors"
    with pytest.raises(NotSupported) as caught:
        merge_adapters(env, sd2, [MergeItem("style")], output, fmt="single-file")  # type: ignore[arg-type]
    assert "sd2" in caught.value.message and caught.value.type == "not_implemented"
    assert not output.exists()
