"""DoRA files on the transformer families (Flux.1, SD3.5): kohya/LyCORIS files on the original model's fused
modules (Flux's ``img_attn.qkv`` / ``txt_attn.qkv`` / single-block ``linear1``, SD3's joint-block qkv) and
on plain ones, and PEFT files with diffusers names, read into the canonical ``dora`` kind and computed
against the base weights exactly as the formulas written out in ``dora_factory`` give them: a fused
module's DoRA normalises the FUSED weight (its per-input-column norm spans every q, k, v (and MLP) row),
so its parts are decomposed together, not one by one. Malformed files are refused, typed, nothing stored.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adapters.delta import dora_deltas
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.identity import BaseIdentity
from adapters.kinds import group
from adapters.kohya_export import to_kohya
from adapters.normalise import normalise
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.fingerprint import Architecture
from tests.adapters import dora_factory as df
from tests.adapters.community_factory import (
    TINY_FLUX,
    TINY_SD35,
    architecture,
    clip,
    flux_transformer,
    sd3_transformer,
)
from tests.adapters.conftest import save_bytes


@cache
def flux() -> tuple[Any, Architecture]:
    transformer = flux_transformer(TINY_FLUX)
    return transformer, architecture("flux", transformer, {"text_encoder": clip()})


@cache
def sd3() -> tuple[Any, Architecture]:
    transformer = sd3_transformer(TINY_SD35)
    encoders = {"text_encoder": clip(), "text_encoder_2": clip(projection=True, seed=1)}
    return transformer, architecture("sd3", transformer, encoders)


def family(name: str) -> tuple[nn.Module, Architecture, dict[str, list[str]]]:
    if name == "flux":
        return (*flux(), df.flux_sources(double=1, single=1))
    return (*sd3(), df.sd3_sources(block=0, dual=True))


def base_weights(transformer: nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    return df.base_weights({"transformer": transformer}, modules)


def served(canonical: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], s: float) -> dict[str, Any]:
    """module → W + D(s), D as the server and ``adapters merge`` compute it."""
    modules, stray = group(canonical)
    assert not stray
    deltas = dora_deltas(modules, lambda m: weights[m], s)
    return {m: weights[m].double() + d.double() for m, d in deltas}


@pytest.mark.parametrize("name", ["flux", "sd3"])
@pytest.mark.parametrize("axis", ["in", "out"])
def test_kohya_dora_on_fused_modules_is_the_fused_weights_dora(name: str, axis: str) -> None:
    transformer, arch, sources = family(name)
    weights = base_weights(transformer, [m for parts in sources.values() for m in parts])
    fused = df.fused_weights(weights, sources)
    raw = df.kohya_dora(fused, lambda source: source, axis=axis, seed=3)
    canonical, info = normalise(raw, arch)
    assert info.kind == "dora" and info.source_format == "kohya"
    modules = group(canonical)[0]
    assert sorted(modules) == sorted(weights)
    # The per-column norm of a fused module spans its parts: they are one group; per-row norms split.
    grouped = {m for m, f in modules.items() if "dora_group" in f}
    assert grouped == (
        {m for parts in sources.values() if len(parts) > 1 for m in parts} if axis == "in" else set()
    )
    for s in (1.0, 0.4):
        reference = df.fused_reference(raw, weights, sources, s)
        got = served(canonical, weights, s)
        for module, want in reference.items():
            assert torch.allclose(got[module], want, rtol=1e-5, atol=1e-6), (module, s)
    if axis == "in":  # normalising each part alone would be another weight: the test tells them apart
        alone = {k: v for k, v in canonical.items() if not k.endswith(".dora_group")}
        part = sources[next(iter(sources))][0]
        wrong = served(alone, weights, 1.0)[part]
        assert not torch.allclose(wrong, df.fused_reference(raw, weights, sources, 1.0)[part], atol=1e-3)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_peft_dora_with_diffusers_names_follows_peft(name: str) -> None:
    """ai-toolkit / SimpleTuner / diffusers write ``transformer.<diffusers module>.lora_A.weight`` …
    ``.lora_magnitude_vector``: one norm per output row of each (unfused) module, the weight inside it."""
    transformer, arch, sources = family(name)
    weights = base_weights(transformer, [m for parts in sources.values() for m in parts])
    raw = df.peft_dora(weights, seed=4)
    canonical, info = normalise(raw, arch)
    assert info.kind == "dora" and info.source_format == "diffusers"
    for s in (1.0, 0.6):
        reference = df.reference_weights(raw, weights, s)
        got = served(canonical, weights, s)
        for module, want in reference.items():
            assert torch.allclose(got[module], want, rtol=1e-5, atol=1e-6), (module, s)
    # PEFT's own state dict (no component; a PeftModel's with ``base_model.model.``): the same adapter
    for prefix in ("", "base_model.model."):
        renamed = {prefix + k.removeprefix("transformer."): v for k, v in raw.items()}
        again, info = normalise(renamed, arch)
        assert info.kind == "dora" and info.source_format == "diffusers"
        assert again.keys() == canonical.keys()
        assert all(torch.equal(again[k], canonical[k]) for k in canonical)


def test_peft_dora_on_fused_original_names_splits_by_rows() -> None:
    """A PEFT-style DoRA under ComfyUI/ai-toolkit names of the original model (``diffusion_model.
    double_blocks.1.img_attn.qkv.lora_A.weight`` …): the magnitude is per output row, so each part takes
    its rows (at any weight the norm of a row is that row's)."""
    transformer, arch, sources = family("flux")
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    parts = sources[qkv]
    weights = base_weights(transformer, parts)
    fused = df.fused_weights(weights, {qkv: parts})
    peft = df.peft_dora({"x": fused[qkv]}, seed=5)
    raw = {k.replace("x.", "diffusion_model.double_blocks.1.img_attn.qkv.", 1): v for k, v in peft.items()}
    canonical, info = normalise(raw, arch)
    assert info.kind == "dora" and info.source_format == "ai-toolkit"
    for s in (1.0, 0.6):
        want = df.split_back(
            {qkv: df.peft_weight(fused[qkv], {k[2:]: v for k, v in peft.items()}, s)}, {qkv: parts}, weights
        )
        got = served(canonical, weights, s)
        for module in parts:
            assert torch.allclose(got[module], want[module], rtol=1e-5, atol=1e-6), (module, s)


def _broken(name: str) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    transformer, arch, sources = family(name)
    weights = base_weights(transformer, [m for parts in sources.values() for m in parts])
    fused = df.fused_weights(weights, sources)
    kohya = df.kohya_dora(fused, lambda source: source, seed=6)
    qkv = next(iter(sources))
    out, inner = fused[qkv].shape
    peft = df.peft_dora(weights)
    part = sources[qkv][0]
    canonical = normalise(kohya, arch)[0]
    siblings = sources[qkv]
    return {
        "fused scale of neither axis": (
            {**kohya, f"{qkv}.dora_scale": torch.ones(1, inner + 1)},
            "shape_mismatch",
        ),
        "fused per-row scale of the parts' rows": (
            {**kohya, f"{qkv}.dora_scale": torch.ones(weights[part].shape[0], 1)},
            "shape_mismatch",
        ),
        "fused per-row scale one row short": (
            {**kohya, f"{qkv}.dora_scale": torch.ones(out - 1, 1)},
            "shape_mismatch",
        ),
        "peft magnitude of the wrong length": (
            {**peft, f"{part}.lora_magnitude_vector": torch.ones(weights[part].shape[0] + 1)},
            "shape_mismatch",
        ),
        "inf in a fused scale": (
            {**kohya, f"{qkv}.dora_scale": torch.full((1, inner), float("inf"))},
            "non_finite",
        ),
        "fused dora beside a plain lora": (
            {k: v for k, v in kohya.items() if k != f"{qkv}.dora_scale"},
            "mixed_adapter_kinds",
        ),
        # canonical files (what `adapters convert --to diffusers` writes) with a tampered group
        "group parts that disagree on the magnitude": (
            {**canonical, f"{siblings[1]}.dora_scale": canonical[f"{siblings[1]}.dora_scale"] * 2},
            "bad_dora_group",
        ),
        "group number that is no integer": (
            {**canonical, f"{siblings[1]}.dora_group": torch.tensor(0.5)},
            "bad_dora_group",
        ),
        "group beside a per-row magnitude": (
            {
                **{k: v for k, v in canonical.items() if not k.startswith(f"{part}.dora_scale")},
                f"{part}.dora_scale": torch.ones(weights[part].shape[0], 1),
            },
            "shape_mismatch",
        ),
    }


CASES = [
    "fused scale of neither axis", "fused per-row scale of the parts' rows",
    "fused per-row scale one row short",
    "peft magnitude of the wrong length", "inf in a fused scale", "fused dora beside a plain lora",
    "group parts that disagree on the magnitude", "group number that is no integer",
    "group beside a per-row magnitude",
]  # fmt: skip


@pytest.mark.parametrize("name", ["flux", "sd3"])
@pytest.mark.parametrize("case", CASES)
def test_malformed_transformer_dora_files_are_refused_and_nothing_is_stored(
    name: str, case: str, tmp_path: Path
) -> None:
    tensors, reason = _broken(name)[case]
    store = open_store(str(tmp_path / "store"))
    identity = BaseIdentity(name=f"tiny-{name}", fingerprint="0" * 64, architecture=family(name)[1])
    with pytest.raises((AdapterInvalid, AdapterIncompatible)) as caught:
        Registry(store, identity).register(save_bytes(tensors), "bad")
    assert caught.value.reason == reason, caught.value.message
    assert store.list("adapters/") == [] and store.list("blobs/") == []


def test_a_fused_weight_without_direction_is_refused_at_load() -> None:
    """ΔW cancels one column of the FUSED weight (every q, k, v row): the column has no direction. Each
    part alone would still have one column of zeros only as a part of the whole, so this is the fused
    norm's check: 409 ``dora_zero_norm`` when the deltas are computed, never a division by eps."""
    transformer, arch, sources = family("flux")
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    weights = base_weights(transformer, sources[qkv])
    fused = df.fused_weights(weights, {qkv: sources[qkv]})[qkv]
    down = torch.zeros(1, fused.shape[1])
    down[0, 2] = 1.0
    raw = {
        f"{qkv}.lora_down.weight": down,
        f"{qkv}.lora_up.weight": -fused[:, 2:3].clone(),
        f"{qkv}.alpha": torch.tensor(1.0),
        f"{qkv}.dora_scale": torch.ones(1, fused.shape[1]),
    }
    canonical, _ = normalise(raw, arch)
    with pytest.raises(AdapterIncompatible) as caught:
        served(canonical, weights, 1.0)
    assert caught.value.reason == "dora_zero_norm"


@pytest.mark.parametrize("name", ["flux", "sd3"])
@pytest.mark.parametrize("file", ["kohya-in", "kohya-out", "peft"])
def test_export_to_kohya_writes_fused_dora_exactly(name: str, file: str) -> None:
    """``adapters convert --to kohya``: the parts of a fused module go back under its original name as one
    DoRA (``lora_down``/``lora_up``/``dora_scale``, alpha = rank) that reads back to the same weights — a
    PEFT file's per-row magnitudes too (at weight 1, as on SD1: kohya readers apply their own rule)."""
    transformer, arch, sources = family(name)
    weights = base_weights(transformer, [m for parts in sources.values() for m in parts])
    fused = df.fused_weights(weights, sources)
    raw = {
        "kohya-in": lambda: df.kohya_dora(fused, lambda source: source, axis="in", seed=7),
        "kohya-out": lambda: df.kohya_dora(fused, lambda source: source, axis="out", seed=8),
        "peft": lambda: df.peft_dora(weights, seed=9),
    }[file]()
    canonical, _ = normalise(raw, arch)
    exported = to_kohya(canonical, arch)
    assert {k.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in exported} == set(
        sources
    )
    assert all(f"{source}.dora_scale" in exported and f"{source}.alpha" in exported for source in sources)
    again, info = normalise(exported, arch)
    assert info.kind == "dora" and info.source_format == "kohya"
    want, got = served(canonical, weights, 1.0), served(again, weights, 1.0)
    for module in weights:
        assert torch.allclose(got[module], want[module], rtol=1e-5, atol=1e-6), module


def test_export_refuses_a_fused_dora_it_cannot_write_exactly() -> None:
    """A per-column DoRA trained on diffusers' to_q / to_k / to_v separately (each normalised alone), or a
    DoRA on part of a fused module: no one DoRA on the fused module equals it."""
    transformer, arch, sources = family("flux")
    qkv = sources["lora_unet_double_blocks_1_img_attn_qkv"]
    weights = base_weights(transformer, qkv)
    apart = df.kohya_dora(weights, lambda m: "lora_unet_" + m.removeprefix("transformer.").replace(".", "_"))
    part = df.peft_dora({qkv[0]: weights[qkv[0]]})
    for tensors, why in ((apart, "normalised separately"), (part, "leaves out")):
        canonical, _ = normalise(tensors, arch)
        with pytest.raises(AdapterInvalid) as caught:
            to_kohya(canonical, arch)
        assert caught.value.reason == "unsupported_conversion" and why in caught.value.message


@pytest.mark.parametrize("name", ["flux", "sd3"])
@pytest.mark.parametrize("axis", ["in", "out"])
def test_kohya_dora_on_the_final_adaln_follows_its_swapped_halves(name: str, axis: str) -> None:
    """``final_layer.adaLN_modulation.1`` is ``shift, scale`` in the original model and ``scale, shift`` in
    diffusers' ``norm_out.linear``: the DoRA of the original weight, its halves swapped back."""
    transformer, arch, _ = family(name)
    module = "transformer.norm_out.linear"
    weight = base_weights(transformer, [module])[module]
    half = weight.shape[0] // 2
    original = torch.cat([weight[half:], weight[:half]])  # shift, scale
    source = "lora_unet_final_layer_adaLN_modulation_1"
    raw = df.kohya_dora({source: original}, lambda s: s, axis=axis, seed=10)
    canonical, _ = normalise(raw, arch)
    for s in (1.0, 0.5):
        dora = df.reference_weights(raw, {source: original}, s, lambda s: s)[source]
        want = torch.cat([dora[half:], dora[:half]])
        got = served(canonical, {module: weight}, s)[module]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), s
