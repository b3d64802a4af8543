"""Flux.1 community LoRA files: converted exactly, and as diffusers' ``lora_conversion_utils`` reads them.

Parity runs on Flux.1-dev's real widths (a meta-device transformer gives the shapes): diffusers'
converters hard-code 19/38 blocks and width 3072, so that is where they can be compared. Each test
builds a random file in the layout, converts it with ours and with diffusers', and compares the
effective ΔW of every module (through a random probe, cheap at full width).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux_lora_to_diffusers,
    _convert_xlabs_flux_lora_to_diffusers,
)

from adapters.community import normalise_community
from adapters.delta import module_delta
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.kinds import group
from adapters.normalise import normalise
from basemodel.families.flux import lora_keys
from basemodel.families.lora_tables import CommunityLayout
from basemodel.fingerprint import Architecture
from tests.adapters.community_factory import (
    FLUX_DEV,
    TINY_FLUX,
    architecture,
    clip,
    deltas,
    flux_transformer,
    kohya_lora,
    probes,
    source_shape,
)

EDGE_BLOCKS = ("double_blocks.0.", "double_blocks.18.", "single_blocks.0.", "single_blocks.37.")


@cache
def flux_dev() -> tuple[Architecture, CommunityLayout]:
    arch = architecture("flux", flux_transformer(FLUX_DEV, meta=True), {"text_encoder": clip()})
    return arch, lora_keys.layout(arch.unet_config or {})


@cache
def tiny_flux() -> tuple[Architecture, CommunityLayout]:
    arch = architecture("flux", flux_transformer(TINY_FLUX, meta=True), {"text_encoder": clip()})
    return arch, lora_keys.layout(arch.unet_config or {})


def sample_names(layout: CommunityLayout) -> list[str]:
    """First and last blocks of each kind, and every module outside the blocks."""
    return [n for n in layout.kohya if n.startswith(EDGE_BLOCKS) or not n.startswith(("double_", "single_"))]


# diffusers drops the alpha of the final layer's two modules (a "TODO: alphas" in its kohya converter) and
# applies them at scale 1.0; sd-scripts applies alpha / rank there as everywhere, and so do we.
NO_ALPHA_IN_DIFFUSERS = ("transformer.norm_out.linear", "transformer.proj_out")


def diffusers_probes(converted: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers' output (some keys without ``transformer.``) as ``transformer.<module>`` → ΔW·P; the final
    layer's multiplied by the ``scale`` diffusers leaves out."""
    named = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    out = probes(named)
    return {m: p * scale if m in NO_ALPHA_IN_DIFFUSERS else p for m, p in out.items()}


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for module in ours:
        torch.testing.assert_close(ours[module], theirs[module], rtol=1e-4, atol=1e-5, msg=module)


def transformer_only(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: d for m, d in probes(canonical).items() if m.startswith("transformer.")}


@pytest.mark.parametrize("alpha", [3.0, None])
def test_kohya_matches_diffusers(alpha: float | None) -> None:
    arch, layout = flux_dev()
    file = kohya_lora(layout.kohya, arch, sample_names(layout), alpha=alpha)
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and info.source_format == "kohya"
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(file))
    assert_same(transformer_only(canonical), diffusers_probes(theirs, (alpha or 2) / 2))
    # the fused qkv and linear1 share one down matrix across their parts (exact, no re-factoring)
    q = canonical["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]
    mlp = canonical["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    assert torch.equal(q, mlp)


def test_kohya_block_sparse_qkv_matches_diffusers() -> None:
    """sd-scripts' ``split_qkv`` files: rank 3·r, up block-diagonal (diffusers takes another path)."""
    arch, layout = flux_dev()
    file = kohya_lora(layout.kohya, arch, ["double_blocks.3.img_attn.qkv"], rank=6)
    up = file["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"]
    for part in range(3):
        rows = slice(part * 3072, (part + 1) * 3072)
        keep = up[rows, part * 2 : part * 2 + 2].clone()
        up[rows] = 0
        up[rows, part * 2 : part * 2 + 2] = keep
    canonical, _ = normalise_community(file, arch, layout) or ({}, None)
    assert_same(
        transformer_only(canonical), diffusers_probes(_convert_kohya_flux_lora_to_diffusers(dict(file)))
    )


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_matches_diffusers(prefix: str) -> None:
    arch, layout = flux_dev()
    names = [n for n in layout.xlabs if n.startswith(EDGE_BLOCKS)]
    file = kohya_lora(
        layout.xlabs, arch, names, alpha=None, prefix=prefix, dotted=True, roles=("down.weight", "up.weight")
    )
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and info.source_format == "xlabs"
    assert_same(
        transformer_only(canonical), diffusers_probes(_convert_xlabs_flux_lora_to_diffusers(dict(file)))
    )


def test_ai_toolkit_bfl_names_match_diffusers() -> None:
    """``diffusion_model.`` + BFL names with lora_A/lora_B (ComfyUI, ai-toolkit) = the same kohya file."""
    arch, layout = flux_dev()
    names = sample_names(layout)
    file = kohya_lora(
        layout.kohya,
        arch,
        names,
        prefix="diffusion_model.",
        dotted=True,
        roles=("lora_A.weight", "lora_B.weight"),
    )
    kohya = kohya_lora(layout.kohya, arch, names)
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and info.source_format == "ai-toolkit"
    theirs = diffusers_probes(_convert_kohya_flux_lora_to_diffusers(dict(kohya)), 1.5)
    assert_same(transformer_only(canonical), theirs)


def test_diffusers_names_are_left_to_the_generic_reader() -> None:
    arch, layout = tiny_flux()
    file = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 16),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(16, 2),
    }
    assert normalise_community(file, arch, layout) is None
    canonical, info = normalise(file, arch, community=False)
    assert info.source_format == "diffusers" and set(canonical) == set(file)


def test_tiny_widths_come_from_the_config() -> None:
    """linear1 splits at the tiny model's own widths (q, k, v 16 each, MLP 64); normalise's shape check
    against the tiny architecture passes, and ΔW of each part is the fused ΔW's rows."""
    arch, layout = tiny_flux()
    assert layout.kohya["single_blocks.1.linear1"][3].rows == ((48, 112),)
    file = kohya_lora(layout.kohya, arch, list(layout.kohya), alpha=1.0)
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and len(info.ranks) == sum(len(t) for t in layout.kohya.values())
    fused = (
        file["lora_unet_single_blocks_1_linear1.lora_up.weight"]
        @ file["lora_unet_single_blocks_1_linear1.lora_down.weight"]
        / 2
    )
    ours = deltas(canonical)
    torch.testing.assert_close(ours["transformer.single_transformer_blocks.1.proj_mlp"], fused[48:112])
    final = (
        file["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
        @ file["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
        / 2
    )
    torch.testing.assert_close(ours["transformer.norm_out.linear"], torch.cat([final[16:], final[:16]]))


def lycoris_file(
    kind: str, arch: Architecture, layout: CommunityLayout, name: str, block: int = 8
) -> dict[str, torch.Tensor]:
    out_f, in_f = source_shape(layout.kohya[name], arch)
    key = "lora_unet_" + name.replace(".", "_")
    gen = torch.Generator().manual_seed(3)
    if kind == "loha":
        f = {"hada_w1_a": (out_f, 2), "hada_w1_b": (2, in_f), "hada_w2_a": (out_f, 2), "hada_w2_b": (2, in_f)}
    elif kind == "lokr":
        f = {"lokr_w1": (out_f // block, 2), "lokr_w2_a": (block, 2), "lokr_w2_b": (2, in_f // 2)}
    else:
        f = {"diff": (out_f, in_f), "diff_b": (out_f,)}
    file = {f"{key}.{role}": torch.randn(*shape, generator=gen) for role, shape in f.items()}
    if kind != "full":
        file[f"{key}.alpha"] = torch.tensor(1.0)
    return file


@pytest.mark.parametrize("kind", ["loha", "lokr", "full"])
def test_lycoris_on_fused_qkv_splits_exactly(kind: str) -> None:
    arch, layout = tiny_flux()
    name = "double_blocks.1.txt_attn.qkv"
    file = lycoris_file(kind, arch, layout, name)
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and info.kind == kind and info.source_format == "kohya"
    whole = {k.rsplit(".", 1)[1]: v for k, v in file.items() if not k.endswith(".alpha")}
    fused = module_delta(kind, whole, (48, 16), 1.0 if kind == "full" else 0.5)  # alpha 1 / rank 2
    modules, _ = group(canonical)
    for part, module in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        name_ = f"transformer.transformer_blocks.1.attn.{module}"
        torch.testing.assert_close(
            module_delta(kind, modules[name_], (16, 16)), fused[part * 16 : (part + 1) * 16]
        )
        if kind == "full":
            torch.testing.assert_close(modules[name_]["diff_b"], whole["diff_b"][part * 16 : (part + 1) * 16])


def test_lokr_across_module_boundaries_is_refused() -> None:
    arch, layout = tiny_flux()
    file = lycoris_file("lokr", arch, layout, "double_blocks.1.img_attn.qkv", block=12)
    with pytest.raises(AdapterInvalid) as err:
        normalise_community(file, arch, layout)
    assert err.value.reason == "unsplittable_adapter"


@pytest.mark.parametrize(
    ("key", "shape", "error", "reason"),
    [
        (
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
            (2, 8),
            AdapterInvalid,
            "unsupported_component",
        ),
        (
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
            (2, 8),
            AdapterInvalid,
            "unsupported_component",
        ),
        (
            "lora_unet_double_blocks_0_img_attn_norm_query_norm.diff",
            (8,),
            AdapterIncompatible,
            "unsupported_module",
        ),
        ("lora_unet_double_blocks_0_img_attn_proj.diff_b", (16,), AdapterInvalid, "unsupported_adapter_type"),
        (
            "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight",
            (2, 16),
            AdapterIncompatible,
            "modules_absent",
        ),
        ("lora_unet_double_blocks_0_img_attn_proj.weird", (2, 16), AdapterInvalid, "unknown_layout"),
    ],
)
def test_refusals_name_the_keys(
    key: str, shape: tuple[int, ...], error: type[Exception], reason: str
) -> None:
    arch, layout = tiny_flux()
    file = kohya_lora(layout.kohya, arch, ["double_blocks.0.img_attn.proj"])
    file[key] = torch.zeros(shape)
    with pytest.raises(error) as err:
        normalise_community(file, arch, layout)
    assert err.value.reason == reason  # type: ignore[attr-defined]


def test_fused_rows_that_do_not_fit_are_a_shape_mismatch() -> None:
    arch, layout = tiny_flux()
    file = kohya_lora(layout.kohya, arch, ["single_blocks.0.linear1"])
    key = "lora_unet_single_blocks_0_linear1.lora_up.weight"
    file[key] = file[key][:-1]
    with pytest.raises(AdapterIncompatible) as err:
        normalise_community(file, arch, layout)
    assert err.value.reason == "shape_mismatch" and "single_blocks_0_linear1" in err.value.message


def test_export_to_kohya_roundtrips_exactly() -> None:
    """kohya → canonical → kohya (fused names, shared downs kept) → canonical: the same ΔW."""
    from adapters.community_export import to_community_kohya

    arch, layout = tiny_flux()
    file = kohya_lora(layout.kohya, arch, list(layout.kohya), alpha=1.0)
    canonical, _ = normalise_community(file, arch, layout) or ({}, None)
    exported = to_community_kohya(
        canonical, layout, lambda m: "lora_te1_" + m.split(".", 1)[1].replace(".", "_")
    )
    assert {k.rsplit(".", 1)[0].rsplit(".", 1)[0] for k in exported} == {
        "lora_unet_" + n.replace(".", "_") for n in layout.kohya
    }
    assert exported["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 2  # shared down
    again, _ = normalise_community(exported, arch, layout) or ({}, None)
    ours, back = probes(canonical), probes(again)
    for module in ours:
        torch.testing.assert_close(back[module], ours[module], msg=module)


def test_export_stacks_different_downs_block_structured() -> None:
    """A PEFT LoRA on to_q and to_v only (own downs) → one qkv LoRA of rank 2+3, k rows zero: exact."""
    from adapters.community_export import to_community_kohya

    arch, layout = tiny_flux()
    canonical = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 16),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(16, 2),
        "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": torch.randn(3, 16),
        "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": torch.randn(16, 3),
    }
    exported = to_community_kohya(canonical, layout, lambda m: m)
    up = exported["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (48, 5) and not up[16:32].any()
    again, _ = normalise_community(exported, arch, layout) or ({}, None)
    back = deltas(again)
    for module in ("to_q", "to_v"):
        name = f"transformer.transformer_blocks.0.attn.{module}"
        torch.testing.assert_close(
            back[name], canonical[f"{name}.lora_B.weight"] @ canonical[f"{name}.lora_A.weight"]
        )
    assert not back["transformer.transformer_blocks.0.attn.to_k"].any()


@pytest.mark.parametrize(
    "factors",
    [
        {"lora_down.weight": (), "lora_up.weight": ()},
        {"lora_down.weight": (2, 16), "lora_up.weight": (64, 2)},
        {"lora_down.weight": (2, 16), "lora_up.weight": (112,)},
        {"lora_down.weight": (2, 15), "lora_up.weight": (112, 2), "alpha": (2,)},
        {"lora_up.weight": (112, 2)},
        {"alpha": ()},
        {"hada_w1_a": (), "hada_w1_b": (2, 16), "hada_w2_a": (112, 2), "hada_w2_b": (2, 16)},
        {
            "hada_w1_a": (4, 112),
            "hada_w1_b": (4, 16),
            "hada_w2_a": (4, 112),
            "hada_w2_b": (4, 16),
            "hada_t1": (4, 4, 1, 1),
            "hada_t2": (4, 4, 1, 1),
        },
        {"lokr_w1": (), "lokr_w2": (8, 16)},
        {"lokr_w1": (14, 1), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 16), "lokr_t2": (2, 2, 1, 1)},
        {"diff": (112, 16), "diff_b": ()},
        {"diff": (112, 16), "lora_down.weight": (2, 16)},
    ],
)
def test_malformed_fused_modules_are_typed_errors(factors: dict[str, tuple[int, ...]]) -> None:
    """Whatever a file holds for a fused module, the answer is a typed 4xx, never a crash."""
    from basemodel.errors import LoraswapError
    from service.errors import status_for

    arch, layout = tiny_flux()
    file = {f"lora_unet_single_blocks_0_linear1.{role}": torch.ones(shape) for role, shape in factors.items()}
    with pytest.raises(LoraswapError) as err:
        normalise_community(file, arch, layout)
    assert status_for(err.value) in (409, 422)


def test_lora_transformer_mixture_names_match_diffusers() -> None:
    """``lora_transformer_<diffusers path with _>`` files (diffusers' "mixture" branch) read the same.
    (That branch maps a single block's ``proj_mlp`` / ``proj_out`` to the block itself, which then loads
    nowhere; we read them by name, so the comparison takes modules diffusers maps right.)"""
    arch, layout = flux_dev()
    gen = torch.Generator().manual_seed(8)
    file: dict[str, torch.Tensor] = {}
    for path in (
        "transformer_blocks.4.attn.to_q",
        "single_transformer_blocks.9.attn.to_k",
        "norm_out.linear",
    ):
        out_f, in_f = arch.modules[f"transformer.{path}"]
        name = "lora_transformer_" + path.replace(".", "_")
        file[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=gen) / in_f**0.5
        file[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=gen)
        file[f"{name}.alpha"] = torch.tensor(1.0)
    canonical, info = normalise_community(file, arch, layout) or ({}, None)
    assert info is not None and info.source_format == "kohya"
    assert_same(
        transformer_only(canonical), diffusers_probes(_convert_kohya_flux_lora_to_diffusers(dict(file)))
    )
