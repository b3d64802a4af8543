"""Every accepted layout normalises to the same canonical tensors; canonical files load in diffusers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adapters.format import read_adapter, write_adapter, write_kohya
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, InferencePlan, TrainingInfo
from adapters.normalise import normalise
from tests.adapters.factory import (
    ALPHA,
    CONV_ALPHA,
    CONV_RANK,
    RANK,
    LoraCase,
    alpha_of,
    diffusers_layout,
    expected_canonical,
    kohya_layout,
    legacy_layout,
    rank_of,
    run_text,
    run_unet,
)


def assert_same(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6
) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        torch.testing.assert_close(actual[key].float(), tensor.float(), rtol=0, atol=atol, msg=key)


def test_kohya_and_diffusers_normalise_to_the_same_canonical_tensors(
    lora_case: LoraCase, base_identity: BaseIdentity
) -> None:
    arch = base_identity.architecture
    from_kohya, kohya_info = normalise(kohya_layout(lora_case), arch)
    from_peft, peft_info = normalise(
        diffusers_layout(lora_case), arch, alpha={m: alpha_of(m) for m in arch.modules}
    )
    from_alpha_keys, _ = normalise(diffusers_layout(lora_case, with_alpha=True), arch)
    from_legacy, legacy_info = normalise(legacy_layout(lora_case), arch)
    expected = expected_canonical(lora_case)
    assert_same(from_kohya, expected)
    assert_same(from_peft, expected)
    assert_same(from_alpha_keys, expected)
    assert_same(from_legacy, expected)
    assert (kohya_info.source_format, peft_info.source_format, legacy_info.source_format) == (
        "kohya",
        "diffusers",
        "diffusers-legacy",
    )
    summary = kohya_info.summary()
    assert summary["rank"] == RANK and summary["alpha"] == ALPHA
    conv = [m for m in summary["target_modules"] if m.endswith("conv1")]
    assert conv and summary["rank_pattern"] == dict.fromkeys(conv, CONV_RANK)
    assert summary["alpha_pattern"] == dict.fromkeys(conv, CONV_ALPHA)
    assert any(m.startswith("text_encoder.") for m in summary["target_modules"])  # TE LoRA kept


def test_trainer_style_peft_keys_are_accepted(lora_case: LoraCase, base_identity: BaseIdentity) -> None:
    """What the trainer passes: get_peft_model_state_dict output, with or without '.default'/prefix."""
    arch = base_identity.architecture
    with_default = {
        f"unet.{k.replace('.lora_A.', '.lora_A.default.').replace('.lora_B.', '.lora_B.default.')}": v
        for k, v in lora_case.unet.items()
    }
    unprefixed = dict(lora_case.unet)  # matched against the base model's module names
    peft_wrapped = {f"base_model.model.{k}": v for k, v in lora_case.text_encoder.items()}
    expected = {k: v for k, v in expected_canonical(lora_case).items() if k.startswith("unet.")}
    rank_alpha = {m: float(rank_of(m)) for m in arch.modules}  # alpha = rank: B unchanged
    a, _ = normalise(with_default, arch, alpha=rank_alpha)
    b, _ = normalise(unprefixed, arch)
    c, _ = normalise(peft_wrapped, arch)
    assert sorted(a) == sorted(expected) == sorted(b)
    for key in expected:
        torch.testing.assert_close(a[key], b[key])
    assert all(k.startswith("text_encoder.encoder.layers.") for k in c)


def test_fp16_and_bf16_are_kept(lora_case: LoraCase, base_identity: BaseIdentity) -> None:
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        tensors, info = normalise(kohya_layout(lora_case, dtype), base_identity.architecture)
        assert info.dtype == name
        assert {t.dtype for t in tensors.values()} == {dtype}


def test_write_adapter_header_carries_loraswap_and_kohya_keys(
    lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    canonical, info = normalise(kohya_layout(lora_case), base_identity.architecture)
    started = "2024-05-01T12:00:00+00:00"
    meta = info.apply_to(
        AdapterMetadata(
            adapter_id="style",
            version=3,
            title="Style",
            base_model=base_identity.info(),
            source_format="kohya",
            training=TrainingInfo(steps=1200, learning_rate=1e-4, started_at=started),  # type: ignore[arg-type]
            inference=InferencePlan(prompts=["a photo of sks"], negative_prompt="blurry", seeds=[1, 2]),
            trigger_words=["sks"],
        )
    )
    path = tmp_path / "out.safetensors"
    data = write_adapter(path, canonical, meta)
    assert path.read_bytes() == data
    tensors, header = read_adapter(path)
    assert all(isinstance(v, str) for v in header.values())
    for key in (
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "ss_new_sd_model_hash",
        "ss_training_started_at",
        "ss_steps",
        "sshs_model_hash",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.date",
        "modelspec.title",
    ):
        assert header.get(key), key
    assert header["ss_network_dim"] == header["ss_network_alpha"] == str(RANK)  # alpha folded
    assert header["ss_steps"] == "1200"
    assert header["ss_new_sd_model_hash"] == base_identity.fingerprint
    assert header["modelspec.title"] == "Style"
    import hashlib

    header_len = int.from_bytes(data[:8], "little")
    assert header["sshs_model_hash"] == hashlib.sha256(data[8 + header_len :]).hexdigest()
    loraswap = json.loads(header["loraswap"])
    assert loraswap["schema_version"] == 1
    assert loraswap["alpha"] == ALPHA and loraswap["rank"] == RANK
    assert loraswap["inference"]["negative_prompt"] == "blurry"
    assert loraswap["base_model"]["architecture_id"] == base_identity.architecture_id
    assert_same(tensors, canonical, atol=0)


def test_write_adapter_refuses_non_canonical_tensors(lora_case: LoraCase, tmp_path: Path) -> None:
    from adapters.errors import AdapterInvalid

    path = tmp_path / "x.safetensors"
    with pytest.raises(AdapterInvalid) as err:
        write_adapter(path, kohya_layout(lora_case), AdapterMetadata())
    assert err.value.reason == "not_canonical"
    assert not path.exists()


def test_kohya_export_round_trips(lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path) -> None:
    arch = base_identity.architecture
    canonical, info = normalise(kohya_layout(lora_case), arch)
    data = write_kohya(tmp_path / "k.safetensors", canonical, info.apply_to(AdapterMetadata()))
    exported, header = read_adapter(data)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in exported)
    assert header["ss_network_dim"] == header["ss_network_alpha"] == "4"
    alphas = {k: v for k, v in exported.items() if k.endswith(".alpha")}
    downs = {k: v for k, v in exported.items() if k.endswith(".lora_down.weight")}
    assert len(alphas) == len(downs) == len(canonical) // 2
    for key, down in downs.items():
        assert float(alphas[key.replace(".lora_down.weight", ".alpha")]) == down.shape[0]
    again, again_info = normalise(exported, arch)
    assert_same(again, canonical, atol=0)
    assert again_info.source_format == "kohya"


def _pipe_copy(base_model: Any) -> Any:
    return copy.deepcopy(base_model.pipe)


def test_normalised_file_loads_in_diffusers_with_the_same_output(
    lora_case: LoraCase, base_identity: BaseIdentity, base_model: Any, tmp_path: Path
) -> None:
    """load_lora_weights on the canonical file == the peft-injected reference, UNet and text encoder."""
    canonical, info = normalise(kohya_layout(lora_case), base_identity.architecture)
    path = tmp_path / "canonical.safetensors"
    write_adapter(path, canonical, info.apply_to(AdapterMetadata(adapter_id="x")))
    pipe = _pipe_copy(base_model)
    pipe.load_lora_weights(str(path), adapter_name="x")
    unet_out = run_unet(pipe.unet, pipe.text_encoder, lora_case.inputs)
    assert not torch.allclose(unet_out, lora_case.base_unet_out, atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(unet_out, lora_case.unet_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run_text(pipe.text_encoder, lora_case.inputs), lora_case.text_out)


def test_kohya_export_loads_in_diffusers_like_the_canonical_file(
    lora_case: LoraCase, base_identity: BaseIdentity, base_model: Any, tmp_path: Path
) -> None:
    """diffusers' own kohya converter applies our export's UNet LoRA exactly like the canonical file.

    (diffusers 0.42 with transformers 5 drops kohya text-encoder attention keys on load — its
    ``to_q_lora`` conversion is incomplete — so only the UNet is compared; see docs/adapters.md.)
    """
    canonical, info = normalise(diffusers_layout(lora_case, with_alpha=True), base_identity.architecture)
    meta = info.apply_to(AdapterMetadata())
    write_adapter(tmp_path / "c.safetensors", canonical, meta)
    write_kohya(tmp_path / "k.safetensors", canonical, meta)
    hidden = run_text(base_model.pipe.text_encoder, lora_case.inputs)
    outputs = []
    for name in ("c", "k"):
        pipe = _pipe_copy(base_model)
        pipe.load_lora_weights(
            safetensors.torch.load_file(tmp_path / f"{name}.safetensors"), adapter_name=name
        )
        with torch.no_grad():
            sample = pipe.unet(
                lora_case.inputs["sample"], lora_case.inputs["timestep"], encoder_hidden_states=hidden
            )
        outputs.append(sample.sample)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = base_model.pipe.unet(
            lora_case.inputs["sample"], lora_case.inputs["timestep"], encoder_hidden_states=hidden
        )
    assert not torch.allclose(outputs[0], plain.sample, atol=1e-3)
