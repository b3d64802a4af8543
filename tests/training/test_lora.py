"""LoRA injection: insertion points, options, only adapter parameters train, DoRA magnitudes exported."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from basemodel.tiny import build_tiny_pipeline
from training.config import build_config
from training.errors import TrainConfigError
from training.export import check_exportable
from training.lora import adapter_tensors, base_weights_hash, inject, set_adapters_enabled


def config(**values: Any) -> Any:
    return build_config({"data": "d", "output": "o"} | values)


@pytest.fixture
def pipe() -> Any:
    return build_tiny_pipeline(0)


def test_default_targets_are_attention_projections(pipe: Any) -> None:
    injection = inject(pipe.unet, pipe.text_encoder, config())
    assert len(injection.unet_modules) == 56 and not injection.text_encoder_modules  # 7 blocks x 2 attn x 4
    assert all(m.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for m in injection.unet_modules)
    names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    assert injection.trainable == sum(p.numel() for p in injection.unet_params)
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert all(float(p.detach().abs().sum()) == 0.0 for p in lora_b)  # starts as the identity


def test_feed_forward_conv_and_text_encoder_targets(pipe: Any) -> None:
    cfg = config(target_modules=["ff.net.2", "conv1"], train_text_encoder=True, rank=4, init="kaiming")
    injection = inject(pipe.unet, pipe.text_encoder, cfg)
    assert any(m.endswith("ff.net.2") for m in injection.unet_modules)
    assert any(m.endswith("conv1") for m in injection.unet_modules)
    assert len(injection.text_encoder_modules) == 8  # 2 layers x q/k/v/out
    tensors = adapter_tensors(pipe.unet, pipe.text_encoder, with_text_encoder=True)
    conv_a = next(v for k, v in tensors.items() if k.endswith("resnets.0.conv1.lora_A.weight"))
    assert conv_a.dim() == 4 and conv_a.shape[0] == 4
    assert any(k.startswith("text_encoder.") and k.endswith(".lora_A.weight") for k in tensors)
    assert all(
        k.startswith(("unet.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in tensors
    )


def test_unknown_target_lists_available_names(pipe: Any) -> None:
    with pytest.raises(TrainConfigError, match="match nothing") as info:
        inject(pipe.unet, pipe.text_encoder, config(target_modules=["to_q", "query"]))
    assert "to_out.0" in info.value.hint and info.value.detail["missing"] == ["query"]


def test_only_adapter_parameters_change(pipe: Any) -> None:
    injection = inject(pipe.unet, pipe.text_encoder, config())
    before = base_weights_hash(pipe.unet, pipe.vae, pipe.text_encoder)
    optimizer = torch.optim.AdamW(injection.unet_params, lr=1e-2, weight_decay=0.1)
    latents = torch.randn(2, 4, 8, 8)
    hidden = torch.randn(2, 77, 64)
    for _ in range(2):
        loss = pipe.unet(latents, torch.tensor([10, 500]), hidden).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert base_weights_hash(pipe.unet, pipe.vae, pipe.text_encoder) == before
    assert any(float(p.detach().abs().sum()) > 0 for n, p in pipe.unet.named_parameters() if "lora_B" in n)
    # the adapter can be switched off: the output is then the base's again
    with torch.no_grad():
        on = pipe.unet(latents, torch.tensor([10, 500]), hidden).sample
        set_adapters_enabled(pipe.unet, pipe.text_encoder, False, False)
        off = pipe.unet(latents, torch.tensor([10, 500]), hidden).sample
        set_adapters_enabled(pipe.unet, pipe.text_encoder, True, False)
    assert not torch.allclose(on, off)


def test_dora_is_exportable_with_its_magnitudes(pipe: Any) -> None:
    cfg = config(dora=True)
    check_exportable(cfg)  # DoRA used to be refused here: the export now keeps the magnitudes
    inject(pipe.unet, pipe.text_encoder, cfg)
    tensors = adapter_tensors(pipe.unet, pipe.text_encoder, False)
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector.weight")]
    assert magnitudes and len(magnitudes) == sum(k.endswith(".lora_A.weight") for k in tensors)
