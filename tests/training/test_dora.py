"""``loraswap train --dora``: a PEFT ``use_dora`` run, cut by a checkpoint and resumed without ``--dora``
on the command line, exports a ``dora`` adapter (PEFT layout, magnitudes included) that ``--register``
stores and the server serves — equal within 1/255 to the trained PEFT model itself, its DoRA layers
merged by PEFT (``merge()``, what ``merge_and_unload`` does) into a plain diffusers pipeline. On SD3 and
Flux the transformer's DoRA serves as diffusers' own ``load_lora_weights`` (PEFT's DoRA layers) draws it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.delta import dora_module_delta
from adapters.errors import AdapterInvalid
from adapters.format import read_adapter
from adapters.interop import write_diffusers
from adapters.kinds import group
from adapters.metadata import AdapterMetadata, parse_header_metadata
from adapters.normalise import normalise
from basemodel.loader import load_base_model
from service.cli import build_parser, main
from tests.adapters import dora_factory as df
from tests.adapters.lycoris_factory import kohya_name
from tests.service import test_flux, test_sd3
from tests.service.conftest import start_server  # noqa: F401  (fixture)
from tests.service.parity import draw, sd_pipeline
from tests.service.test_hotswap import generate, pixels
from tests.training.conftest import make_config
from tests.training.test_flow import FLUX_TARGETS
from training.cli import resolve_config
from training.data.synth import synth_dataset
from training.loop import Trainer
from training.lora import text_encoder_map
from training.run import RunResult, train

OPTIONS: dict[str, Any] = {
    "steps": 4,
    "lr": 3e-2,
    "rank": 4,
    "alpha": 8,
    "dora": True,
    "train_text_encoder": True,
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1"],
    "checkpoint_every": 2,
    "eval_samples": 0,
    "sample_steps": 1,
}


@dataclass
class DoraRun:
    result: RunResult
    trainer: Trainer  # the resumed run's trainer: the trained PEFT model
    store: Path


@pytest.fixture(scope="module")
def dora_run(loraswap_home: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DoraRun:
    root = tmp_path_factory.mktemp("dora")
    quiet: dict[str, Any] = {"models_dir": loraswap_home / "models", "echo": lambda *_: None}

    def stop_at_2(trainer: Trainer) -> None:
        if trainer.step == 2:
            trainer.request_stop()

    cut = train(make_config(synth_dir, root / "run", **OPTIONS), on_step=stop_at_2, **quiet)
    assert cut.interrupted and cut.adapter_path is None
    argv = ["train", "--output", str(root / "run"), "--resume", "latest"]
    argv += ["--register", "dora-style", "--store", str(root / "store")]
    config = resolve_config(build_parser().parse_args(argv))  # no --dora: the checkpoint's config has it
    assert config.dora
    trainers: list[Trainer] = []
    result = train(config, on_step=trainers.append, **quiet)
    assert result.loop is not None and result.loop.step == 4 and trainers[-1].step == 4
    return DoraRun(result, trainers[-1], root / "store")


def peft_merged_pipeline(trainer: Trainer, model_dir: Path) -> StableDiffusionPipeline:
    """tiny-sd with copies of the trained UNet and text encoder whose PEFT DoRA layers merged themselves."""
    unet = copy.deepcopy(trainer.unet).eval()
    (encoder,) = text_encoder_map(trainer.text_encoders).values()
    encoder = copy.deepcopy(encoder).eval()
    merged = 0
    for model in (unet, encoder):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                assert module.lora_magnitude_vector, "a DoRA layer"
                module.merge(safe_merge=True)
                merged += 1
    assert merged > 0
    return sd_pipeline(model_dir, unet=unet, text_encoder=encoder)


def test_dora_export_is_served_as_peft_trained_it(
    dora_run: DoraRun, start_server: Any, tiny_model_dir: Path
) -> None:
    result = dora_run.result
    assert result.adapter_path is not None and result.ref == "dora-style@1"
    tensors, header = read_adapter(result.adapter_path)
    magnitudes = [k for k in tensors if ".lora_magnitude_vector" in k]
    assert any(k.startswith("unet.") for k in magnitudes) and any(
        k.startswith("text_encoder.") for k in magnitudes
    )
    conv = next(k for k in magnitudes if k.endswith("conv1.lora_magnitude_vector"))
    assert tensors[conv].shape[0] == 1 and tensors[conv].dim() == 4  # PEFT's conv magnitude [1, out, 1, 1]
    metadata = parse_header_metadata(header)
    assert metadata is not None and metadata.kind == "dora"
    assert metadata.description is not None and metadata.description.startswith("DoRA trained")
    assert json.loads(header["ss_network_args"])["dora_wd"] == "True"

    server = start_server(store=str(dora_run.store))
    body = generate(server, adapters=[{"id": "dora-style"}])
    assert body["adapters"][0]["version"] == 1
    served = pixels(body["images"][0])
    base = pixels(generate(server)["images"][0])
    reference = draw(peft_merged_pipeline(dora_run.trainer, tiny_model_dir))
    assert np.abs(served - reference).max() <= 1
    assert np.abs(served - base).mean() > 2, "the trained DoRA changes the image"


def test_dora_export_inspects_as_dora_and_loads_in_diffusers(
    dora_run: DoraRun,
    loraswap_home: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = dora_run.result.adapter_path
    assert path is not None
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    assert main(["adapters", "inspect", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "dora" and shown["source_format"] == "diffusers"
    assert shown["components"] == ["text_encoder", "unet"] and shown["rank"] == 4

    # diffusers turns on PEFT's use_dora and takes the file's magnitudes, the text encoder's included,
    # so it draws what was trained too
    pipe = sd_pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(path), adapter_name="dora")
    tensors, _ = read_adapter(path)
    for component, module, key in (
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "{}.lora_magnitude_vector"),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj", "{}.lora_magnitude_vector.weight"),
    ):
        layer = getattr(pipe, component).get_submodule(module)
        loaded = layer.lora_magnitude_vector["dora"].weight
        name = f"{component}.{'text_model.' if component == 'text_encoder' else ''}{module}"
        torch.testing.assert_close(loaded, tensors[key.format(name)].to(loaded.dtype), rtol=0, atol=0)
    trained = draw(peft_merged_pipeline(dora_run.trainer, tiny_model_dir))
    assert np.abs(draw(pipe) - trained).max() <= 1


def test_dora_export_converts_to_kohya_with_per_row_dora_scale(
    dora_run: DoraRun,
    base_model: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loraswap_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``adapters convert --to kohya``: ``dora_scale`` ``[out, 1(, 1, 1)]`` (the per-row axis docs/adapters.md
    names), the same weight at 1.0 as the PEFT export."""
    path = dora_run.result.adapter_path
    assert path is not None
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    out = tmp_path / "kohya.safetensors"
    assert main(["adapters", "convert", str(path), "--to", "kohya", "-o", str(out)]) == 0
    assert "dora" in capsys.readouterr().out
    kohya, _ = read_adapter(out)
    assert all(v.shape[1:] in ((1,), (1, 1, 1)) for k, v in kohya.items() if k.endswith(".dora_scale"))
    # back --to diffusers: the PEFT export converts (the same bytes' tensors); the kohya file, whose
    # dora_scale names kohya's weight rule, has no PEFT layout and is refused, nothing written
    again = tmp_path / "again.safetensors"
    assert main(["adapters", "convert", str(path), "--to", "diffusers", "-o", str(again)]) == 0
    assert read_adapter(again)[0].keys() == read_adapter(path)[0].keys()
    refused = tmp_path / "refused.safetensors"
    assert main(["adapters", "convert", str(out), "--to", "diffusers", "-o", str(refused)]) != 0
    assert "not a PEFT DoRA module" in capsys.readouterr().err and not refused.exists()
    architecture = base_model.architecture
    peft_modules, _ = group(normalise(read_adapter(path)[0], architecture)[0])
    kohya_modules, _ = group(normalise(kohya, architecture)[0])
    assert peft_modules.keys() == kohya_modules.keys()
    for module, factors in peft_modules.items():
        component, name = module.split(".", 1)
        weight = base_model.lora_components[component].get_submodule(name).weight
        torch.testing.assert_close(
            dora_module_delta(kohya_modules[module], weight),
            dora_module_delta(factors, weight),
            rtol=0,
            atol=1e-5,
        )


def test_write_diffusers_round_trips_peft_dora_and_refuses_kohya_dora(base_model: Any) -> None:
    """The PEFT DoRA layout reads back to the same canonical tensors; a kohya/LyCORIS ``dora_scale``
    (its own axis and weight rule) has no PEFT layout and is refused, typed."""
    weights = df.base_weights(base_model.lora_components, df.SD1_TARGETS)
    architecture = base_model.architecture
    canonical, _ = normalise(df.peft_dora(weights), architecture)
    data = write_diffusers(None, canonical, AdapterMetadata(), architecture)
    tensors, header = read_adapter(data)
    assert any(k.endswith("proj_in.lora_magnitude_vector") for k in tensors)
    again, info = normalise(tensors, architecture)
    assert info.kind == "dora" and info.source_format == "diffusers" and again.keys() == canonical.keys()
    for key, tensor in canonical.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=0)
    assert json.loads(header["ss_network_args"]) == {
        "algo": "lora",
        "dora_wd": "True",
        "wd_on_output": "True",
    }
    kohya, _ = normalise(df.kohya_dora(weights, kohya_name, axis="in"), architecture)
    with pytest.raises(AdapterInvalid, match="not a PEFT DoRA module") as refused:
        write_diffusers(None, kohya, AdapterMetadata(), architecture)
    assert refused.value.reason == "unsupported_conversion"


FLOW_FAMILIES = {
    "tiny-sd3-random": (test_sd3, {}),
    "tiny-flux-random": (test_flux, {"target_modules": FLUX_TARGETS}),
}


@pytest.mark.parametrize("name", list(FLOW_FAMILIES))
def test_transformer_dora_trains_registers_and_serves(
    name: str, loraswap_home: Path, tmp_path: Path, start_server: Any
) -> None:
    """A DoRA on the SD3 / Flux transformer: exported, registered as kind dora, served as diffusers'
    ``load_lora_weights`` (which turns on PEFT's ``use_dora`` for the magnitudes) draws the file."""
    module, options = FLOW_FAMILIES[name]
    synth_dataset(tmp_path / "data", n=4, val=2, style="neon", size=32, seed=3)
    quick = {"batch_size": 2, "sample_steps": 1, "eval_samples": 0, "val_timesteps": 2}
    config = make_config(
        tmp_path / "data",
        tmp_path / "run",
        **quick,
        **options,
        base_model=name,
        steps=3,
        lr=3e-2,
        dora=True,
        register_id="flow-dora",
        store=str(tmp_path / "store"),
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.adapter_path is not None and result.ref == "flow-dora@1"
    tensors, header = read_adapter(result.adapter_path)
    metadata = parse_header_metadata(header)
    assert metadata is not None and metadata.kind == "dora"
    assert any(k.startswith("transformer.") and k.endswith(".lora_magnitude_vector") for k in tensors)
    base = load_base_model(name, loraswap_home / "models", device="cpu", dtype="fp32")
    server = start_server(loader=lambda _: base, store=str(tmp_path / "store"))
    request = {"prompt": "a neon circle"}
    ours = module.images(server, **request, adapters=[{"id": "flow-dora"}])
    assert (
        module.max_diff(
            ours, module.diffusers_reference(base.ref.path, [(result.adapter_path, 1.0)], **request)
        )
        <= 1
    )
    assert module.max_diff(ours, module.images(server, **request)) > 2, "the trained DoRA changes the image"
