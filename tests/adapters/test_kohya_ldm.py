"""kohya LDM/SGM UNet names: the table from the UNet config, diffusers as the oracle, SD1 and SDXL bases.

Two diffusers converters are the oracle for the table: its LoRA loader's SGM remapping
(``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``, what
``load_lora_weights`` runs) and its single-file checkpoint converter (``convert_ldm_unet_checkpoint``).
The LoRA remapping matches ``input_blocks_1`` against ``input_blocks_10``/``_11`` by substring, so it
cannot read an SD1.5-layout file (12 input blocks) at all; the checkpoint converter checks those.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_unet_state_dict_to_peft
from torch import nn

from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.format import read_adapter, write_adapter, write_kohya
from adapters.identity import BaseIdentity
from adapters.kohya_ldm import kohya_unet_names, ldm_unet_names
from adapters.metadata import AdapterMetadata, BaseModelInfo, interop_keys
from adapters.normalise import normalise, to_kohya
from adapters.registry import Registry
from adapters.sources import LocalStore
from basemodel.fingerprint import Architecture
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import LoraCase, expected_canonical, kohya_layout, ldm_kohya_layout
from tests.adapters.sgm_factory import (
    TINY_SDXL,
    UNETS,
    TinySdxl,
    merge,
    random_kohya,
    tiny_sdxl,
    unet_for,
    unet_modules,
)
from tests.adapters.sgm_factory import expected_canonical as expected_from_parts
from tests.adapters.test_normalise import assert_same

# Real names from the SDXL base UNet and SD1.5 → (diffusers module, weight shape).
EXAMPLES = {
    "sdxl": {
        "input_blocks.0.0": ("conv_in", (320, 4, 3, 3)),
        "input_blocks.1.0.in_layers.2": ("down_blocks.0.resnets.0.conv1", (320, 320, 3, 3)),
        "input_blocks.3.0.op": ("down_blocks.0.downsamplers.0.conv", (320, 320, 3, 3)),
        "input_blocks.4.0.emb_layers.1": ("down_blocks.1.resnets.0.time_emb_proj", (640, 1280)),
        "input_blocks.4.0.skip_connection": ("down_blocks.1.resnets.0.conv_shortcut", (640, 320, 1, 1)),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            (640, 640),
        ),
        "input_blocks.8.1.transformer_blocks.9.ff.net.2": (
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
            (1280, 5120),
        ),
        "middle_block.1.transformer_blocks.9.attn2.to_k": (
            "mid_block.attentions.0.transformer_blocks.9.attn2.to_k",
            (1280, 2048),
        ),
        "output_blocks.2.2.conv": ("up_blocks.0.upsamplers.0.conv", (1280, 1280, 3, 3)),
        "output_blocks.8.0.skip_connection": ("up_blocks.2.resnets.2.conv_shortcut", (320, 640, 1, 1)),
        "label_emb.0.0": ("add_embedding.linear_1", (1280, 2816)),
        "time_embed.2": ("time_embedding.linear_2", (1280, 1280)),
        "out.2": ("conv_out", (4, 320, 3, 3)),
    },
    "sd15": {
        "input_blocks.1.1.proj_in": ("down_blocks.0.attentions.0.proj_in", (320, 320, 1, 1)),
        "input_blocks.11.0.out_layers.3": ("down_blocks.3.resnets.1.conv2", (1280, 1280, 3, 3)),
        "middle_block.2.emb_layers.1": ("mid_block.resnets.1.time_emb_proj", (1280, 1280)),
        "output_blocks.2.1.conv": ("up_blocks.0.upsamplers.0.conv", (1280, 1280, 3, 3)),  # no attention
        "output_blocks.5.2.conv": ("up_blocks.1.upsamplers.0.conv", (1280, 1280, 3, 3)),
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k": (
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
            (320, 768),
        ),
    },
}


@pytest.fixture(scope="module")
def sdxl() -> TinySdxl:
    return tiny_sdxl()


# -- the table ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNETS)
def test_table_names_every_targetable_unet_module_exactly_once(name: str) -> None:
    unet = unet_for(name)
    table = ldm_unet_names(unet.config)
    assert sorted(table.values()) == sorted(unet_modules(unet))
    assert len(kohya_unet_names(unet.config)) == len(table)  # the '_' form is unambiguous too


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_real_checkpoint_names_map_to_the_right_module_and_shape(name: str) -> None:
    unet = unet_for(name)
    table, modules = ldm_unet_names(unet.config), unet_modules(unet)
    for ldm, (module, shape) in EXAMPLES[name].items():
        assert table[ldm] == module, ldm
        assert modules[module] == shape, module


def _tagged_lora(config: Any) -> dict[str, torch.Tensor]:
    """A kohya SGM file whose lora_down for LDM name number i is filled with i."""
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(sorted(kohya_unet_names(config))):
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.full((1, 1), float(i))
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(1, 1)
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    return tensors


@pytest.mark.parametrize("name", ["tiny-sd", TINY_SDXL, "sdxl"])
def test_table_agrees_with_diffusers_lora_loader(name: str) -> None:
    config = unet_for(name).config
    converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(_tagged_lora(config), unet_config=config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    theirs = {k.removesuffix(".lora_A.weight"): int(v.item()) for k, v in peft.items() if ".lora_A." in k}
    names = sorted(kohya_unet_names(config))
    ours = {kohya_unet_names(config)[n]: i for i, n in enumerate(names)}
    assert theirs == ours


@pytest.mark.parametrize("name", UNETS)
def test_table_agrees_with_diffusers_single_file_converter(name: str) -> None:
    config = unet_for(name).config
    table = ldm_unet_names(config)
    ldm_names = sorted(table)
    checkpoint: dict[str, torch.Tensor] = {}
    for i, ldm in enumerate(ldm_names):
        checkpoint[f"model.diffusion_model.{ldm}.weight"] = torch.full((1,), float(i))
        checkpoint[f"model.diffusion_model.{ldm}.bias"] = torch.zeros(1)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(config))
    theirs = {k.removesuffix(".weight"): int(v.item()) for k, v in converted.items() if k.endswith(".weight")}
    assert theirs == {table[ldm]: i for i, ldm in enumerate(ldm_names)}


# -- SD1: LDM-named kohya files read through the same table ---------------------------------------


def test_sd1_ldm_kohya_file_normalises_like_the_diffusers_style_one(
    lora_case: LoraCase, base_identity: BaseIdentity, base_model: Any
) -> None:
    ldm = ldm_kohya_layout(kohya_layout(lora_case), base_model.pipe.unet.config)
    assert any(k.startswith("lora_unet_input_blocks_") for k in ldm)
    assert any(k.startswith("lora_unet_output_blocks_") for k in ldm)
    assert any(k.startswith("lora_te_") for k in ldm)
    canonical, info = normalise(ldm, base_identity.architecture)
    assert_same(canonical, expected_canonical(lora_case))
    assert info.source_format == "kohya"


@pytest.mark.parametrize("base", ["tiny-sd", TINY_SDXL])
def test_kohya_ldm_file_applies_like_diffusers_loading_it(
    base: str, base_model: Any, request: pytest.FixtureRequest
) -> None:
    """Every UNet module + text-encoder MLPs (diffusers drops kohya text attention keys, docs/adapters.md):
    diffusers' loader on the kohya file == our canonical tensors applied by their definition."""
    if base == "tiny-sd":
        models = {"unet": base_model.pipe.unet, "text_encoder": base_model.pipe.text_encoder}
        architecture, loader = base_model.architecture, StableDiffusionLoraLoaderMixin
        te1 = "lora_te_"
    else:
        shaped = request.getfixturevalue("sdxl")
        models, architecture, loader = shaped.models(), shaped.architecture, StableDiffusionXLLoraLoaderMixin
        te1 = "lora_te1_"
    unet_config = models["unet"].config
    kohya, _ = random_kohya(architecture, unet_config, lambda p: ".mlp." in p, te1_prefix=te1)
    canonical, _ = normalise(kohya, architecture)

    ours = {name: copy.deepcopy(model) for name, model in models.items()}
    merge(ours, canonical)
    theirs = {name: copy.deepcopy(model) for name, model in models.items()}
    state, alphas = loader.lora_state_dict(dict(kohya), unet_config=unet_config)
    loader.load_lora_into_unet(state, alphas, unet=theirs["unet"], adapter_name="k")
    for component in ("text_encoder", "text_encoder_2"):
        if component in theirs:
            loader.load_lora_into_text_encoder(
                state, alphas, text_encoder=theirs[component], prefix=component, adapter_name="k"
            )
    plain = _outputs(models)
    expected, actual = _outputs(theirs), _outputs(ours)
    for key in plain:
        assert not torch.allclose(expected[key], plain[key], atol=1e-3), f"{key}: the LoRA must act"
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


@torch.no_grad()
def _outputs(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    unet = models["unet"]
    ids = torch.randint(2, 90, (1, 8), generator=gen)
    cross = int(unet.config.cross_attention_dim)
    inputs: dict[str, Any] = {"encoder_hidden_states": torch.randn(1, 8, cross, generator=gen)}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = int(unet.config.projection_class_embeddings_input_dim) - 6 * int(
            unet.config.addition_time_embed_dim
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled_dim, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    sample = torch.randn(1, int(unet.config.in_channels), 16, 16, generator=gen)
    out = {"unet": unet(sample, torch.tensor([400]), **inputs).sample}
    for component in ("text_encoder", "text_encoder_2"):
        if component in models:
            out[component] = models[component](ids)[0]
    return out


# -- SDXL: kohya SGM names + lora_te1_/lora_te2_, with and without text_model_ --------------------


def test_sdxl_kohya_file_normalises_to_unet_and_both_text_encoders(sdxl: TinySdxl) -> None:
    kohya, parts = sdxl.kohya(lambda path: True)  # attention, MLP and text_projection
    # te1 (CLIPTextModel) has no text_model level, te2 (…WithProjection) has one: write the other form
    flipped = {
        k.replace("lora_te1_", "lora_te1_text_model_").replace("lora_te2_text_model_", "lora_te2_"): v
        for k, v in kohya.items()
    }
    for tensors in (kohya, flipped):
        canonical, info = normalise(tensors, sdxl.architecture)
        assert_same(canonical, expected_from_parts(parts))
        assert info.source_format == "kohya"
    components = {k.split(".", 1)[0] for k in canonical}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight" in canonical
    assert "text_encoder.encoder.layers.1.self_attn.q_proj.lora_A.weight" in canonical


def test_sdxl_kohya_export_round_trips_and_loads_in_diffusers(sdxl: TinySdxl, tmp_path: Path) -> None:
    kohya, _ = sdxl.kohya(lambda path: ".mlp." in path)
    canonical, info = normalise(kohya, sdxl.architecture)
    base = BaseModelInfo(name=TINY_SDXL, fingerprint="f" * 64, family="sdxl")
    meta = info.apply_to(AdapterMetadata(base_model=base))
    exported, header = read_adapter(write_kohya(None, canonical, meta, sdxl.architecture))
    assert {k.split("_", 2)[1] for k in exported} == {"unet", "te1", "te2"}
    unet_names = {k.split(".")[0].removeprefix("lora_unet_") for k in exported if k.startswith("lora_unet_")}
    assert unet_names == set(kohya_unet_names(sdxl.unet.config))  # sd-scripts' SGM names
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    again, _ = normalise(exported, sdxl.architecture)
    assert_same(again, canonical, atol=1e-6)

    ours = sdxl.models()
    merge(ours, canonical)
    theirs = sdxl.models()
    loader = StableDiffusionXLLoraLoaderMixin
    state, alphas = loader.lora_state_dict(dict(exported), unet_config=sdxl.unet.config)
    loader.load_lora_into_unet(state, alphas, unet=theirs["unet"], adapter_name="k")
    torch.testing.assert_close(_outputs(theirs)["unet"], _outputs(ours)["unet"], rtol=1e-4, atol=1e-4)


def test_kohya_export_names_are_the_familys(
    sdxl: TinySdxl, lora_case: LoraCase, base_identity: BaseIdentity
) -> None:
    """The family picks the names: SDXL writes SGM UNet names even for a UNet-only adapter; SD1.x keeps
    diffusers-style names and lora_te_ although its descriptor carries a UNet config too."""
    kohya, _ = sdxl.kohya(lambda path: False)
    unet_only, _ = normalise(kohya, sdxl.architecture)
    exported = to_kohya(unet_only, sdxl.architecture)
    assert {k.split(".")[0] for k in exported} == {
        f"lora_unet_{n}" for n in kohya_unet_names(sdxl.unet.config)
    }
    assert base_identity.architecture.unet_config is not None
    sd1 = to_kohya(expected_canonical(lora_case), base_identity.architecture)
    assert set(sd1) == set(to_kohya(expected_canonical(lora_case)))  # no architecture: SD1.x's names
    assert {k.split("_")[1] for k in sd1} == {"unet", "te"}
    assert not any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in sd1)


def test_sdxl_diffusers_layout_reads_and_writes(sdxl: TinySdxl, tmp_path: Path) -> None:
    """PEFT keys with a text_encoder_2. prefix: canonical in, canonical out, loadable by diffusers."""
    _, parts = sdxl.kohya(lambda path: True)
    canonical = expected_from_parts(parts)
    peft = {k.replace(".lora_A.", ".lora_A.default."): v for k, v in canonical.items()}
    normalised, info = normalise(peft, sdxl.architecture)
    assert_same(normalised, canonical)
    path = tmp_path / "sdxl.safetensors"
    write_adapter(path, normalised, info.apply_to(AdapterMetadata()))
    stored, _ = read_adapter(path)
    assert_same(stored, canonical, atol=0)
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path))
    unet = copy.deepcopy(sdxl.unet)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=unet, adapter_name="d")
    ours = sdxl.models()
    merge(ours, canonical)
    torch.testing.assert_close(
        _outputs({"unet": unet})["unet"], _outputs({"unet": ours["unet"]})["unet"], rtol=1e-4, atol=1e-4
    )


# -- wrong family, unknown names, no config: typed errors, nothing stored -------------------------


def _register(tensors: dict[str, torch.Tensor], architecture: Architecture, tmp_path: Path) -> Exception:
    identity = BaseIdentity(name="base", fingerprint="0" * 64, architecture=architecture)
    store = LocalStore(tmp_path / "store")
    with pytest.raises((AdapterIncompatible, AdapterInvalid)) as err:
        Registry(store, identity).register(save_bytes(tensors), "victim")
    assert store.list() == []
    return err.value


def test_sdxl_file_on_an_sd1_base_names_both_families(
    sdxl: TinySdxl, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    kohya, _ = sdxl.kohya(lambda path: ".mlp." in path)
    err = _register(kohya, base_identity.architecture, tmp_path)
    assert isinstance(err, AdapterIncompatible)
    assert err.detail["reason"] == "family_mismatch"
    assert "SDXL (sdxl)" in err.message and "SD1.x (sd1)" in err.message and "lora_te2_" in err.message
    assert err.detail["adapter_family"] == "sdxl" and err.detail["base_family"] == base_identity.family
    unet_only = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
    err = _register(unet_only, base_identity.architecture, tmp_path)
    assert isinstance(err, AdapterIncompatible)
    assert err.detail["reason"] in ("modules_absent", "shape_mismatch")


def test_sd1_ldm_file_on_an_sdxl_base_is_incompatible(
    sdxl: TinySdxl, lora_case: LoraCase, base_model: Any, tmp_path: Path
) -> None:
    ldm = ldm_kohya_layout(kohya_layout(lora_case), base_model.pipe.unet.config)
    err = _register(ldm, sdxl.architecture, tmp_path)
    assert isinstance(err, AdapterIncompatible)
    assert err.detail["reason"] == "modules_absent"
    assert "input_blocks_1_1" in err.message  # SDXL's first down block has no attention


@pytest.mark.parametrize("config", [None, {"down_block_types": ["KDownBlock2D"]}])
def test_ldm_names_without_a_usable_unet_config_are_an_unknown_layout(
    config: dict[str, Any] | None, base_identity: BaseIdentity, lora_case: LoraCase, tmp_path: Path
) -> None:
    arch = base_identity.architecture
    unet_config = None if config is None else {**(arch.unet_config or {}), **config}
    bare = Architecture(modules=arch.modules, family=arch.family, unet_config=unet_config)
    ldm = ldm_kohya_layout(kohya_layout(lora_case), arch.unet_config)
    err = _register(ldm, bare, tmp_path)
    assert isinstance(err, AdapterInvalid)
    assert err.detail["reason"] == "unknown_layout"
    assert "LDM" in err.message
    normalise(kohya_layout(lora_case), bare)  # diffusers-style kohya names still need no config


# -- descriptor and metadata ----------------------------------------------------------------------


def test_architecture_keeps_the_unet_config(base_model: Any, loraswap_home: Path) -> None:
    arch = base_model.architecture
    assert arch.unet_config is not None
    assert arch.unet_config["block_out_channels"] == list(base_model.pipe.unet.config.block_out_channels)
    assert not any(k.startswith("_") for k in arch.unet_config)
    again = Architecture.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert again.unet_config == arch.unet_config
    assert again.architecture_id == arch.architecture_id  # the config is not part of the identity
    from_spec = BaseIdentity.from_spec("tiny-sd", loraswap_home / "models").architecture
    assert from_spec.unet_config == arch.unet_config


@pytest.mark.parametrize(
    ("family", "modelspec", "kohya"),
    [
        ("sd1", "stable-diffusion-v1/lora", "sd_v1"),
        (None, "stable-diffusion-v1/lora", "sd_v1"),
        ("sd2", "stable-diffusion-v2-512/lora", "sd_v2"),
        ("sdxl", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"),
        ("custom-64", "custom-64/lora", "loraswap_custom-64"),
    ],
)
def test_interop_keys_name_the_family(family: str | None, modelspec: str, kohya: str) -> None:
    keys = interop_keys(AdapterMetadata(base_model=BaseModelInfo(name="b", family=family)))
    assert keys["modelspec.architecture"] == modelspec
    assert keys["ss_base_model_version"] == kohya


@pytest.mark.parametrize(
    ("family", "prediction", "modelspec", "kohya", "spec_prediction"),
    [
        ("sd2", "v_prediction", "stable-diffusion-v2-768-v/lora", "sd_v2_v", "v"),
        ("sd2", "epsilon", "stable-diffusion-v2-512/lora", "sd_v2", "epsilon"),
        ("sd1", "epsilon", "stable-diffusion-v1/lora", "sd_v1", "epsilon"),
    ],
)
def test_interop_keys_follow_the_prediction_type(
    family: str, prediction: str, modelspec: str, kohya: str, spec_prediction: str
) -> None:
    """An SD2 768-v base (v-prediction) is labelled as one, not as SD2 512 (epsilon)."""
    info = BaseModelInfo(name="b", family=family, prediction_type=prediction)
    keys = interop_keys(AdapterMetadata(base_model=info))
    assert keys["modelspec.architecture"] == modelspec
    assert keys["ss_base_model_version"] == kohya
    assert keys["modelspec.prediction_type"] == spec_prediction
