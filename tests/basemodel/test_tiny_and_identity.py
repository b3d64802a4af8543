"""The embedded tiny-sd model, base-model resolution, fingerprint and architecture descriptor."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from basemodel.errors import BaseModelError, ConfigError, UnsafeFormat
from basemodel.fingerprint import Architecture, fingerprint
from basemodel.loader import resolve_base_model, resolve_dtype
from basemodel.tiny import save_tiny


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".loraswap")
    }


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118


def test_random_variant_same_seed_gives_byte_identical_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = save_tiny(tmp_path / "first", seed=0)
    rebuilt = save_tiny(tmp_path / "again", seed=0)
    other = save_tiny(tmp_path / "other", seed=1)
    assert tree_digest(rebuilt) == tree_digest(first)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert tree_digest(other)[weights] != tree_digest(rebuilt)[weights]
    # the random-init variant is the pretrained model's architecture with other weights
    assert tree_digest(first)[weights] != tree_digest(tiny_model_dir)[weights]
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        name = f"{part}.safetensors"
        assert tensor_shapes(first / name) == tensor_shapes(tiny_model_dir / name)


def test_tiny_is_a_real_sd_pipeline_with_sd15_names(base_model: Any) -> None:
    pipe = base_model.pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    modules = base_model.architecture.modules
    assert modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (64, 64)
    assert modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (128, 64)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in modules
    # transformers 5 dropped CLIPTextModel's `text_model.` level; 4.x still has it
    assert any(
        name in modules
        for name in (
            "text_encoder.encoder.layers.0.self_attn.q_proj",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        )
    )
    assert base_model.native_size == 32


def test_tokenizer_keeps_common_words_whole(base_model: Any) -> None:
    tokens = base_model.pipe.tokenizer.tokenize("a red circle on a blue background")
    assert tokens == ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>"]
    from basemodel.tokenizer import word_list

    for word in word_list():
        assert base_model.pipe.tokenizer.tokenize(word) == [word + "</w>"]
    assert base_model.pipe.tokenizer("zebra!").input_ids[0] == base_model.pipe.tokenizer.bos_token_id


def test_fingerprint_is_stable_cached_and_content_sensitive(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "m", seed=0)
    first = fingerprint(model)
    assert len(first) == 64
    assert (model / ".loraswap-fingerprint.json").is_file()
    assert fingerprint(model) == first
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(model) != first


def test_single_file_fingerprint_is_plain_sha256(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"0123456789")
    assert fingerprint(path) == hashlib.sha256(b"0123456789").hexdigest()


def test_architecture_round_trips_and_identifies(base_model: Any) -> None:
    arch = base_model.architecture
    again = Architecture.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert again.architecture_id == arch.architecture_id
    changed = Architecture({**arch.modules, "unet.extra": (1, 1)})
    assert changed.architecture_id != arch.architecture_id


def test_resolve_refuses_pickle_and_missing(tmp_path: Path) -> None:
    for suffix in (".ckpt", ".pt", ".bin", ".pth"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(b"\x80\x04not-really-a-pickle")
        with pytest.raises(UnsafeFormat):
            resolve_base_model(str(path), tmp_path)
    with pytest.raises(BaseModelError, match="not found"):
        resolve_base_model(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match=r"model_index\.json"):
        resolve_base_model(str(tmp_path / "empty"), tmp_path)


def test_resolve_local_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    ref = resolve_base_model(str(tiny_model_dir), tmp_path)
    assert ref.kind == "diffusers"
    assert ref.path == tiny_model_dir.resolve()


def test_fp16_on_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        resolve_dtype("fp16", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_cli_init_tiny_and_info(tmp_path: Path) -> None:
    env_home = {"LORASWAP_HOME": str(tmp_path / "home")}
    run = [sys.executable, "-m", "service.cli"]
    built = subprocess.run(
        [*run, "model", "init-tiny", "--output", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), **env_home},
    )
    assert built.returncode == 0, built.stderr
    info = subprocess.run(
        [*run, "model", "info", "--base-model", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), **env_home},
    )
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["fingerprint"] == fingerprint(tmp_path / "t")
    assert summary["targetable_modules"] > 50
    bad = subprocess.run(
        [*run, "model", "info", "--base-model", str(tmp_path / "x.ckpt")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), **env_home},
    )
    assert bad.returncode == 2
    assert "error[unsafe_format]" in bad.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_unknown_base_model_names_help(tmp_path: Path) -> None:
    """Issue 20, item 9: a hub id or a near miss lists the built-in names; a hub id is never downloaded."""
    from basemodel.loader import BUILT_IN_NAMES

    with pytest.raises(BaseModelError) as hub:
        resolve_base_model("runwayml/stable-diffusion-v1-5", tmp_path)
    for name in BUILT_IN_NAMES:
        assert name in hub.value.message
    assert "never downloads" in hub.value.message
    assert "hf download runwayml/stable-diffusion-v1-5 --local-dir" in hub.value.hint
    assert hub.value.detail["hub_id"] is True and hub.value.detail["built_in"] == list(BUILT_IN_NAMES)
    with pytest.raises(BaseModelError) as near:
        resolve_base_model("tiny-sdxl", tmp_path)
    assert near.value.detail["suggestion"] == "tiny-sdxl-random"
    assert "Did you mean 'tiny-sdxl-random'?" in near.value.hint and "tiny-sd," in near.value.message
    assert not (tmp_path / "tiny-sdxl").exists()
