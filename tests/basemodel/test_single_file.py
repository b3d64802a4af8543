"""Single-file SD1.x checkpoints: LDM-layout .safetensors in, an offline StableDiffusionPipeline out.

SD1.5 itself cannot be downloaded here, so the round trip uses tiny-sd written out in the original
LDM key layout (``model.diffusion_model.…``, ``first_stage_model.…``, ``cond_stage_model.…``) by the
diffusers→LDM converter below, and loads it back with tiny-sd's configs as the override.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from basemodel.errors import BaseModelError, UnsafeFormat
from basemodel.single_file import SD15_CONFIG_DIR, build_clip_tokenizer, load_single_file

# --- diffusers → original LDM key layout (the inverse of diffusers' single-file conversion) ---------

RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str:
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old) :]
            for a, b in (inner or {}).items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
            return prefixes[old] + rest
    return key


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    plain = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's text_time embedding
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for i in range(blocks):
        for j in range(per):
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.0."
            plain[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.1."
        for j in range(per + 1):
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (per + 1) + j}.0."
            plain[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (per + 1) + j}.1."
        if i < blocks - 1:
            plain[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
            slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            plain[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{slot}."
    out = {}
    for key, tensor in state.items():
        is_resnet = any(key.startswith(p) for p in resnets)
        new = _rename(key, resnets, RESNET) if is_resnet else _rename(key, plain)
        out["model.diffusion_model." + new] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    resnets = {
        f"{part}.mid_block.resnets.{k}.": f"{part}.mid.block_{k + 1}."
        for part in ("encoder", "decoder")
        for k in (0, 1)
    }
    plain = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(blocks):
        for j in range(per):
            resnets[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per + 1):
            resnets[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{blocks - 1 - i}.block.{j}."
        plain[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        plain[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{blocks - 1 - i}.upsample."
    attention = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    out = {}
    for key, tensor in state.items():
        if any(key.startswith(p) for p in attention):
            new = _rename(key, attention, VAE_ATTENTION)
            tensor = tensor[..., None, None] if tensor.ndim == 2 else tensor  # LDM keeps 1x1 convs here
        elif any(key.startswith(p) for p in resnets):
            new = _rename(key, resnets, {"conv_shortcut.": "nin_shortcut."})
        else:
            new = _rename(key, plain)
        out["first_stage_model." + new] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): tensor
        for key, tensor in state.items()
    }


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **clip_to_ldm(pipe.text_encoder.state_dict()),
        # What real A1111/CivitAI files carry besides the three models: all of it must be ignored.
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None].float(),
        "alphas_cumprod": torch.linspace(1, 0, 1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1, dtype=torch.int32),
    }
    return {key: tensor.contiguous() for key, tensor in state.items()}


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    """The embedded model as installed (its configs are the ``config_dir`` below), in fp32."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True
    )


@pytest.fixture(scope="module")
def ldm_file(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single-file") / "tiny-ldm.safetensors"
    save_file(pipeline_to_ldm(tiny), str(path))
    return path


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module, dtype: torch.dtype) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == dtype, key
        assert torch.equal(got[key], tensor.to(dtype)), key


def _public(config: Any) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


# --- round trip -----------------------------------------------------------------------------------


def test_ldm_layout_matches_real_sd1_key_names(ldm_file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(ldm_file), framework="pt") as handle:
        keys = set(handle.keys())
    for key in (  # names as they appear in v1-5-pruned-emaonly.safetensors
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key


def test_round_trip_restores_every_weight(
    tiny: Any, ldm_file: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_single_file tried to open a network connection")

    with monkeypatch.context() as patch:
        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "getaddrinfo", no_network)
        pipe = load_single_file(ldm_file, torch.float32, config_dir=tiny_model_dir)
    _assert_same_weights(pipe.unet, tiny.unet, torch.float32)
    _assert_same_weights(pipe.vae, tiny.vae, torch.float32)
    _assert_same_weights(pipe.text_encoder, tiny.text_encoder, torch.float32)
    assert not pipe.unet.training and not pipe.text_encoder.training
    assert pipe.tokenizer("a red circle").input_ids == tiny.tokenizer("a red circle").input_ids
    assert type(pipe.scheduler) is type(tiny.scheduler)
    assert _public(pipe.scheduler.config) == _public(tiny.scheduler.config)

    def generate(p: Any) -> Any:
        p.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return p(
            "a red circle", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np"
        )

    assert (generate(pipe).images == generate(tiny).images).all()


def test_round_trip_casts_to_requested_dtype(tiny: Any, ldm_file: Path, tiny_model_dir: Path) -> None:
    pipe = load_single_file(ldm_file, torch.bfloat16, config_dir=tiny_model_dir)
    _assert_same_weights(pipe.unet, tiny.unet, torch.bfloat16)
    _assert_same_weights(pipe.text_encoder, tiny.text_encoder, torch.bfloat16)


def test_default_config_is_sd15_and_rejects_a_mismatched_checkpoint(ldm_file: Path) -> None:
    with pytest.raises(BaseModelError, match="cross-attention width 64"):
        load_single_file(ldm_file, torch.float32)


# --- refusals -------------------------------------------------------------------------------------


def _fake(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    return path


def test_incomplete_sdxl_checkpoint_is_refused_naming_the_missing_encoder(tmp_path: Path) -> None:
    path = _fake(
        tmp_path / "sdxl.safetensors",
        {
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
            "conditioner.embedders.1.foo": (1,),
            "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
            "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
        },
    )
    with pytest.raises(BaseModelError, match=r"without OpenCLIP ViT-bigG text encoder") as info:
        load_single_file(path, torch.float32)
    assert not isinstance(info.value, UnsafeFormat)


def test_sd2_checkpoint_is_refused(tmp_path: Path) -> None:
    path = _fake(
        tmp_path / "sd2.safetensors",
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
            "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
            "cond_stage_model.model.token_embedding.weight": (10, 8),
        },
    )
    with pytest.raises(BaseModelError, match=r"detected an SD2\.x checkpoint"):
        load_single_file(path, torch.float32)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"down_blocks.0.resnets.0.conv1.weight": (4, 4)},
            r"unknown layout \(top-level key prefixes: down_blocks",
        ),
        ({"lora_unet_down_blocks_0.lora_down.weight": (4, 4)}, "LoRA adapter"),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)},
            "without VAE .* or CLIP text encoder",
        ),
    ],
)
def test_other_layouts_are_refused(tmp_path: Path, keys: dict[str, tuple[int, ...]], message: str) -> None:
    with pytest.raises(BaseModelError, match=message):
        load_single_file(_fake(tmp_path / "other.safetensors", keys), torch.float32)


def test_inpainting_unet_is_refused(tmp_path: Path) -> None:
    path = _fake(
        tmp_path / "inpaint.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
            "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
        },
    )
    with pytest.raises(BaseModelError, match="inpainting UNet with 9 input channels"):
        load_single_file(path, torch.float32)


def test_missing_weights_are_named(tmp_path: Path, tiny: Any, tiny_model_dir: Path) -> None:
    state = pipeline_to_ldm(tiny)
    del state["first_stage_model.decoder.conv_out.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(
        BaseModelError, match=r"VAE weights do not match .*missing 1 \(decoder.conv_out.weight\)"
    ):
        load_single_file(tmp_path / "partial.safetensors", torch.float32, config_dir=tiny_model_dir)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_unopened(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was opened")

    monkeypatch.setattr("basemodel.single_file.safe_open", never)
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFormat, match=r"only \.safetensors"):
        load_single_file(path, torch.float32)
    with pytest.raises(UnsafeFormat):  # refused by name alone: not even a stat
        load_single_file(tmp_path / f"absent{suffix}", torch.float32)


def test_truncated_safetensors_is_a_clean_error(ldm_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    data = ldm_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BaseModelError, match=r"not a readable \.safetensors file"):
        load_single_file(cut, torch.float32, config_dir=tiny_model_dir)


@pytest.mark.parametrize("payload", [b"", b"garbage" * 10, (2**40).to_bytes(8, "little") + b"{}"])
def test_garbage_safetensors_is_a_clean_error(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(payload)
    with pytest.raises(BaseModelError, match=r"not a readable \.safetensors file"):
        load_single_file(path, torch.float32)


# --- the shipped SD1.5 configs and CLIP tokenizer -------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "ids"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("A PHOTO of  a Cat!", [49406, 320, 1125, 539, 320, 2368, 256, 49407]),
        ("Hello, world!", [49406, 3306, 267, 1002, 256, 49407]),
        ("An astronaut riding a horse", [49406, 550, 18376, 6765, 320, 4558, 49407]),
    ],
)
def test_shipped_tokenizer_reproduces_clip_ids(prompt: str, ids: list[int]) -> None:
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer(prompt).input_ids == ids
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 49407


def test_shipped_unet_config_is_sd15() -> None:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.cross_attention_dim == 768


def test_shipped_text_encoder_and_vae_configs_are_sd15() -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextConfig.from_dict(
        json.loads((SD15_CONFIG_DIR / "text_encoder" / "config.json").read_text())
    )
    vae_config = json.loads((SD15_CONFIG_DIR / "vae" / "config.json").read_text())
    with init_empty_weights():
        text_encoder = CLIPTextModel(text)
        vae = AutoencoderKL.from_config(vae_config)
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
