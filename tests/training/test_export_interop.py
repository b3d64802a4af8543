"""The trainer's export loads in diffusers and, converted with ``adapters convert --to kohya``, has the
key layout sd-scripts reads — for a text-encoder LoRA on the MLP only too (diffusers once refused that
export: "Could not automatically infer state dict type")."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from adapters.normalise import normalise
from service.cli import main
from tests.training.conftest import make_config

SD_SCRIPTS_TARGETS = {  # sd-scripts networks/lora.py: prefix and the classes whose Linear/1x1 convs get LoRA
    "unet": ("lora_unet", {"Transformer2DModel"}),
    "text_encoder": ("lora_te", {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}),
}


def sd_scripts_modules(pipe: Any) -> dict[str, nn.Module]:
    """The LoRA names sd-scripts' ``LoRANetwork.create_modules`` gives an SD1.x model, and their modules.

    sd-scripts runs transformers 4, whose CLIPTextModel has a ``text_model.`` level (transformers 5
    flattened it), so text-encoder names get it here as they do there."""
    found: dict[str, nn.Module] = {}
    for component, (prefix, classes) in SD_SCRIPTS_TARGETS.items():
        for name, module in getattr(pipe, component).named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                conv_1x1 = isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
                if not (isinstance(child, nn.Linear) or conv_1x1):
                    continue
                path = f"{name}.{child_name}"
                if component == "text_encoder" and not path.startswith("text_model."):
                    path = "text_model." + path
                found[f"{prefix}.{path}".replace(".", "_")] = child
    return found


class SdScriptsLoRA(nn.Module):
    """The parameters of sd-scripts' ``LoRAModule`` (``lora_down``, ``lora_up``, the ``alpha`` buffer)."""

    def __init__(self, target: nn.Module, rank: int) -> None:
        super().__init__()
        if isinstance(target, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(target.in_channels, rank, 1, bias=False)
            self.lora_up: nn.Module = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        else:
            assert isinstance(target, nn.Linear)
            self.lora_down = nn.Linear(target.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False)
        self.register_buffer("alpha", torch.tensor(float(rank)))


def load_like_sd_scripts(pipe: Any, weights: dict[str, torch.Tensor]) -> set[str]:
    """``create_network_from_weights`` + a strict ``load_state_dict``: the LoRA names of the file."""
    modules = sd_scripts_modules(pipe)
    names = {key.split(".", 1)[0] for key in weights}
    assert names <= set(modules), f"names sd-scripts does not create: {sorted(names - set(modules))[:5]}"
    network = nn.Module()
    for name in sorted(names):
        network.add_module(name, SdScriptsLoRA(modules[name], weights[f"{name}.lora_down.weight"].shape[0]))
    network.load_state_dict(weights, strict=True)  # every key, every shape
    return names


@pytest.fixture(scope="module")
def mlp_te_export(loraswap_home: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.run import train

    config = make_config(
        synth_dir,
        tmp_path_factory.mktemp("mlp-te") / "run",
        steps=2,
        lr=5e-2,
        rank=4,
        target_modules=["to_q", "to_v"],
        train_text_encoder=True,
        text_encoder_target_modules=["fc1", "fc2"],
        eval_samples=0,
        sample_steps=1,
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.adapter_path is not None
    return result.adapter_path


def test_mlp_only_text_encoder_export_loads_in_diffusers(mlp_te_export: Path, base_model: Any) -> None:
    pipe = copy.deepcopy(base_model.pipe)
    pipe.load_lora_weights(str(mlp_te_export), adapter_name="trained")  # raised before the fix
    canonical, _ = normalise(
        read_adapter(mlp_te_export)[0], BaseIdentity.from_base_model(base_model).architecture
    )
    assert any(".mlp.fc1." in k for k in canonical) and not any("self_attn" in k for k in canonical)
    merged = copy.deepcopy(base_model.pipe.text_encoder)  # the reference: W + B·A in each MLP Linear
    modules = dict(merged.named_modules())
    for key, down in canonical.items():
        if key.startswith("text_encoder.") and key.endswith(".lora_A.weight"):
            path = key.removeprefix("text_encoder.").removesuffix(".lora_A.weight")
            up = canonical[key.replace(".lora_A.", ".lora_B.")]
            modules[path].weight.data += up.float() @ down.float()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        ours, reference, plain = (
            m(ids)[0] for m in (pipe.text_encoder, merged, base_model.pipe.text_encoder)
        )
    assert (ours - plain).abs().max() > 1e-4, "the text-encoder LoRA must do something"
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)


def test_mlp_only_text_encoder_export_has_the_sd_scripts_layout_as_kohya(
    mlp_te_export: Path, base_model: Any, loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    kohya = tmp_path / "kohya.safetensors"
    assert main(["adapters", "convert", str(mlp_te_export), "--to", "kohya", "-o", str(kohya)]) == 0
    weights, _ = read_adapter(kohya)
    names = load_like_sd_scripts(base_model.pipe, weights)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2" in names
    assert any(n.startswith("lora_unet_down_blocks_") and n.endswith("_attn1_to_q") for n in names)
