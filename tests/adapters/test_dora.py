"""DoRA files (kohya/LyCORIS ``dora_scale`` on either axis, PEFT ``lora_magnitude_vector``): their own
canonical kind, the weight they give at both scale rules against formulas written out in the test and
against PEFT's own ``use_dora`` forward, registration, export, and the refusals of malformed files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

from adapters.delta import dora_module_delta, dora_weight
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from adapters.kinds import group
from adapters.normalise import normalise
from adapters.registry import Registry
from adapters.sources import open_store
from service.cli import main
from tests.adapters import dora_factory as df
from tests.adapters.conftest import save_bytes
from tests.adapters.lycoris_factory import kohya_name


@pytest.fixture(scope="module")
def weights(base_model: Any) -> dict[str, torch.Tensor]:
    return df.base_weights(base_model.lora_components, df.SD1_TARGETS)


def _files(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "kohya-in": df.kohya_dora(weights, kohya_name, axis="in"),
        "kohya-out": df.kohya_dora(weights, kohya_name, axis="out", seed=1),
        "peft": df.peft_dora(weights, seed=2),
    }


@pytest.mark.parametrize("name", ["kohya-in", "kohya-out", "peft"])
@pytest.mark.parametrize("scale", [1.0, 0.6, -0.4])
def test_dora_weight_matches_the_formula_at_each_scale(
    name: str, scale: float, weights: dict[str, torch.Tensor], base_identity: BaseIdentity
) -> None:
    raw = _files(weights)[name]
    canonical, info = normalise(raw, base_identity.architecture)
    assert info.kind == "dora" and info.source_format == ("diffusers" if name == "peft" else "kohya")
    modules, stray = group(canonical)
    assert not stray and sorted(modules) == sorted(df.SD1_TARGETS)
    magnitude = "dora_magnitude" if name == "peft" else "dora_scale"
    assert all(set(f) == {"dora_down", "dora_up", magnitude} for f in modules.values())
    reference = df.reference_weights(raw, weights, scale, None if name == "peft" else kohya_name)
    for module, factors in modules.items():
        got = weights[module].double() + dora_module_delta(factors, weights[module], scale).double()
        assert torch.allclose(got, reference[module], rtol=1e-5, atol=1e-6), module


def test_the_two_scale_rules_differ_as_documented(weights: dict[str, torch.Tensor]) -> None:
    """kohya/LyCORIS: linear in the weight (W + s·D, so 0 gives W); PEFT: the weight inside the norm."""
    module = df.SD1_TARGETS[0]
    w = weights[module]
    kohya, _ = normalise(df.kohya_dora({module: w}, kohya_name), _arch(w, module))
    factors = group(kohya)[0][module]
    one = dora_module_delta(factors, w, 1.0)
    assert torch.allclose(dora_module_delta(factors, w, 0.3), 0.3 * one, atol=1e-7)
    assert torch.count_nonzero(dora_module_delta(factors, w, 0.0)) == 0
    peft, _ = normalise(df.peft_dora({module: w}), _arch(w, module))
    factors = group(peft)[0][module]
    at = {s: dora_module_delta(factors, w, s) for s in (0.0, 0.3, 1.0)}
    assert not torch.allclose(at[0.3], 0.3 * at[1.0], atol=1e-4)  # not linear
    assert torch.count_nonzero(at[0.0]) > 0  # PEFT at 0 still rescales W by m / ‖W‖


def _arch(weight: torch.Tensor, module: str) -> Any:
    from basemodel.fingerprint import Architecture

    return Architecture(family="sd1", modules={module: tuple(weight.shape)})


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_peft_rule_equals_peft_use_dora_forward(kind: str) -> None:
    """Our canonical form of a PEFT DoRA state dict, applied at weight s, equals PEFT's own DoRA layer
    with ``scaling = (alpha / r) · s`` (what diffusers' ``set_adapters`` sets)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(base)
    peft = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    state = {
        f"unet.{k.removeprefix('base_model.model.')}": v for k, v in get_peft_model_state_dict(peft).items()
    }
    architecture = _arch(base.weight, "unet.0")
    canonical, info = normalise(state, architecture, alpha=6.0)
    factors = group(canonical)[0]["unet.0"]
    x = torch.randn(2, 12) if kind == "linear" else torch.randn(2, 4, 5, 5)
    for s in (1.0, 0.5):
        layer.scaling["default"] = 2.0 * s
        with torch.no_grad():
            want = peft(x)
            w = base.weight + dora_module_delta(factors, base.weight.detach(), s)
            got = (
                nn.functional.linear(x, w, base.bias)
                if kind == "linear"
                else base._conv_forward(x, w, base.bias)
            )
        assert torch.allclose(got, want, atol=1e-5), s
    assert info.kind == "dora" and info.alphas["unet.0"] == 6.0


def test_registered_dora_keeps_its_kind_and_exports_to_kohya(
    weights: dict[str, torch.Tensor],
    base_identity: BaseIdentity,
    tmp_path: Path,
    loraswap_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = Registry(open_store(str(tmp_path / "store")), base_identity)
    for name, tensors in _files(weights).items():
        version = registry.register(save_bytes(tensors), name)
        assert version.kind == "dora" and version.num_modules == len(df.SD1_TARGETS)
        assert json.loads(registry.store.get(f"adapters/{name}/versions/1.json"))["kind"] == "dora"
        loaded = registry.open(name)
        assert loaded.metadata.kind == "dora" and not any(".lora_A." in k for k in loaded.tensors)
    # kohya export: lora_down/lora_up/dora_scale (PEFT's magnitude as [out, 1…]), alpha = rank; it reads
    # back to the same weight at 1.0.
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    for name, tensors in _files(weights).items():
        source, out = tmp_path / f"{name}.safetensors", tmp_path / f"{name}-kohya.safetensors"
        source.write_bytes(save_bytes(tensors))
        assert main(["adapters", "convert", str(source), "--to", "kohya", "-o", str(out)]) == 0
        assert "dora" in capsys.readouterr().out
        exported, _ = read_adapter(out)
        name0 = kohya_name(df.SD1_TARGETS[0])
        assert {f"{name0}.lora_down.weight", f"{name0}.dora_scale", f"{name0}.alpha"} <= set(exported)
        again = group(normalise(exported, base_identity.architecture)[0])[0]
        first = group(normalise(tensors, base_identity.architecture)[0])[0]
        for module, factors in first.items():
            want = dora_module_delta(factors, weights[module])
            assert torch.allclose(dora_module_delta(again[module], weights[module]), want, atol=1e-5)


def _broken(weights: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    kohya = df.kohya_dora(weights, kohya_name)
    peft = df.peft_dora(weights)
    lin, conv = df.SD1_TARGETS[0], df.SD1_TARGETS[3]
    name, conv_name = kohya_name(lin), kohya_name(conv)
    out, inner = weights[lin].shape
    plain = df.SD1_TARGETS[1]
    return {
        "scale of neither axis": (
            {**kohya, f"{name}.dora_scale": torch.ones(1, inner + 1)},
            "shape_mismatch",
        ),
        "scale of a 3x3 conv as a linear's": (
            {**kohya, f"{conv_name}.dora_scale": torch.ones(1, 7)},
            "shape_mismatch",
        ),
        "magnitude of the wrong length": (
            {**peft, f"{lin}.lora_magnitude_vector": torch.ones(out + 2)},
            "shape_mismatch",
        ),
        "magnitude without its halves": (
            {
                k: v
                for k, v in kohya.items()
                if k not in (f"{name}.lora_down.weight", f"{name}.lora_up.weight")
            },
            "incomplete_pair",
        ),
        "halves do not multiply": ({**kohya, f"{name}.lora_up.weight": torch.ones(out, 3)}, "shape_mismatch"),
        "nan magnitude": (
            {**kohya, f"{name}.dora_scale": torch.full((1, inner), float("nan"))},
            "non_finite",
        ),
        "dora beside a plain lora": (
            {k: v for k, v in kohya.items() if not k.startswith(f"{kohya_name(plain)}.dora_scale")},
            "mixed_adapter_kinds",
        ),
        "dora on a loha": (
            {**kohya, f"{name}.hada_w1_a": torch.ones(out, 2)},
            "unsupported_adapter_type",
        ),
    }


CASES = [
    "scale of neither axis", "scale of a 3x3 conv as a linear's", "magnitude of the wrong length",
    "magnitude without its halves", "halves do not multiply", "nan magnitude", "dora beside a plain lora",
    "dora on a loha",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_malformed_dora_files_are_refused_and_nothing_is_stored(
    case: str, weights: dict[str, torch.Tensor], base_identity: BaseIdentity, tmp_path: Path
) -> None:
    tensors, reason = _broken(weights)[case]
    store = open_store(str(tmp_path / "store"))
    with pytest.raises((AdapterInvalid, AdapterIncompatible)) as caught:
        Registry(store, base_identity).register(save_bytes(tensors), "bad")
    assert caught.value.reason == reason, caught.value.message
    assert store.list("adapters/") == [] and store.list("blobs/") == []


def test_a_zero_norm_is_refused_at_load() -> None:
    """W + ΔW with a zero column has no direction: a typed error, not a silent eps-sized division."""
    weight = torch.ones(3, 4)
    delta = torch.zeros(3, 4)
    delta[:, 1] = -1.0
    with pytest.raises(AdapterIncompatible) as caught:
        dora_weight(weight, delta, torch.ones(1, 4), "in")
    assert caught.value.reason == "dora_zero_norm"
    assert torch.isfinite(dora_weight(weight, torch.zeros(3, 4), torch.ones(1, 4), "in")).all()
