"""Single-file SDXL checkpoints: SGM-layout .safetensors in, an offline StableDiffusionXLPipeline out.

SDXL itself cannot be downloaded here, so the round trip writes tiny-sdxl-random in the SGM key layout
(``model.diffusion_model.…`` with ``label_emb``, ``first_stage_model.…``, CLIP ViT-L under
``conditioner.embedders.0.transformer.``, OpenCLIP under ``conditioner.embedders.1.model.`` with fused
``in_proj`` and a transposed ``text_projection``) and loads it back with its own folder as the configs.
The shipped SDXL configs are checked by the sizes they build.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from basemodel.families import detect_checkpoint
from basemodel.families.sdxl.tiny import build_tiny_sdxl_pipeline
from basemodel.single_file import SDXL_CONFIG_DIR, load_single_file
from tests.basemodel.test_single_file import _assert_same_weights, unet_to_ldm, vae_to_ldm

OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection → OpenCLIP names, q/k/v fused into ``in_proj``."""
    out: dict[str, torch.Tensor] = {"text_projection": state["text_projection.weight"].T}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = tensor
            continue
        if not key.startswith("text_model.encoder.layers."):
            continue
        layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
        prefix = f"transformer.resblocks.{layer}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            part, kind = rest.removeprefix("self_attn.").split(".")  # q_proj, weight|bias
            fused.setdefault(f"{prefix}attn.in_proj_{kind}", {})[part[0]] = tensor
            continue
        for old, new in OPENCLIP_LAYER.items():
            if rest.startswith(old):
                rest = new + rest.removeprefix(old)
        out[prefix + rest] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sdxl_to_sgm(pipe: Any) -> dict[str, torch.Tensor]:
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **{
            "conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model."): tensor
            for key, tensor in pipe.text_encoder.state_dict().items()
        },
        **{
            "conditioner.embedders.1.model." + key: tensor
            for key, tensor in open_clip_to_ldm(pipe.text_encoder_2.state_dict()).items()
        },
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),  # in real files, unused
        "denoiser.sigmas": torch.linspace(14.6, 0.03, 1000),
    }
    return {key: tensor.contiguous() for key, tensor in state.items()}


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """(tiny-sdxl-random, its diffusers folder as the configs, the same model as one SGM file)."""
    pipe = build_tiny_sdxl_pipeline()
    folder = tmp_path_factory.mktemp("xl-single")
    pipe.save_pretrained(folder / "diffusers", safe_serialization=True)
    save_file(sdxl_to_sgm(pipe), str(folder / "tiny-sdxl.safetensors"))
    return pipe, folder / "diffusers", folder / "tiny-sdxl.safetensors"


def test_sgm_layout_has_real_sdxl_key_names(tiny_xl: tuple[Any, Path, Path]) -> None:
    with safe_open(str(tiny_xl[2]), framework="pt") as handle:
        keys = set(handle.keys())
    for key in (  # names as they appear in sd_xl_base_1.0.safetensors
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.ln_final.weight",
    ):
        assert key in keys, key
    assert detect_checkpoint(keys).name == "sdxl"  # type: ignore[union-attr]


def test_sdxl_single_file_round_trip_draws_what_the_folder_draws(
    tiny_xl: tuple[Any, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    original, configs, checkpoint = tiny_xl

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_single_file tried to open a network connection")

    with monkeypatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "getaddrinfo", no_network)
        pipe = load_single_file(checkpoint, torch.float32, config_dir=configs)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(pipe, name), getattr(original, name), torch.float32)
    assert pipe.tokenizer_2("a red circle").input_ids == original.tokenizer_2("a red circle").input_ids

    def generate(p: Any) -> Any:
        p.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return p("a red circle", num_inference_steps=2, generator=generator, output_type="np").images

    assert (generate(pipe) == generate(original)).all()


def test_shipped_sdxl_configs_build_sdxl_base() -> None:
    """The shipped configs are SDXL base 1.0's: the sizes they build, the OpenCLIP pad token."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from basemodel.single_file import load_tokenizer

    def read(part: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((SDXL_CONFIG_DIR / part).read_text())
        return result

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read("unet/config.json"))
        vae = AutoencoderKL.from_config(read("vae/config.json"))
        one = CLIPTextModel(CLIPTextConfig.from_dict(read("text_encoder/config.json")))
        two = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read("text_encoder_2/config.json")))
    sizes = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, one, two)]
    assert sizes == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert unet.add_embedding.linear_1.in_features == 6 * 256 + two.config.projection_dim
    assert load_tokenizer(SDXL_CONFIG_DIR / "tokenizer_2").pad_token == "!"
    assert load_tokenizer(SDXL_CONFIG_DIR / "tokenizer").pad_token == "<|endoftext|>"


def test_default_configs_are_sdxl_base_and_refuse_a_mismatched_checkpoint(
    tiny_xl: tuple[Any, Path, Path],
) -> None:
    """Without a config folder the shipped SDXL base configs are used; the tiny checkpoint does not fit
    them, which is a clean BaseModelError that says what was found."""
    from basemodel.errors import BaseModelError

    with pytest.raises(BaseModelError, match=r"cross-attention width 96; the config expects 2048"):
        load_single_file(tiny_xl[2], torch.float32)


def test_a_checkpoint_diffusers_cannot_convert_is_a_clean_error(tmp_path: Path) -> None:
    """All four SDXL components present but the UNet is not a UNet: a BaseModelError naming it (diffusers'
    converter raises a bare KeyError here)."""
    from basemodel.errors import BaseModelError

    keys = {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,),
        "conditioner.embedders.1.model.ln_final.weight": (8,),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
    }
    path = tmp_path / "broken.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    with pytest.raises(BaseModelError, match=r"the UNet weights cannot be converted: missing .*label_emb"):
        load_single_file(path, torch.float32)
