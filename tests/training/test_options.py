"""Less common options in short runs: bf16, gradient checkpointing, v-prediction, buckets, disk cache,
text-encoder LoRA, CLIP score from a local model, DoRA without export, fp16 fallback on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapters.format import read_adapter
from basemodel.tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer
from tests.training.conftest import make_config
from training.checkpoint import resolve_resume
from training.config import build_config
from training.data.synth import synth_dataset
from training.run import precision, train


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mixed") / "neon"
    paths = synth_dataset(folder, n=8, val=2, style="neon", size=48, seed=2)
    for i, path in enumerate(paths[:4]):
        Image.open(path).resize((48, 24) if i % 2 else (24, 48)).save(path)
    return folder


def tiny_clip(folder: Path) -> Path:
    """A random, local CLIP model + processor (only to exercise the --clip-model code path)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("bos", BOS), ("eos", EOS))}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["eos"],
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_many_options_together(loraswap_home: Path, mixed_sizes: Path, tmp_path: Path) -> None:
    options: dict[str, Any] = {
        "steps": 2,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "prediction_type": "v_prediction",
        "buckets": True,
        "cache": "disk",
        "cache_dir": str(tmp_path / "cache"),
        "train_text_encoder": True,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1"],
        "text_encoder_lr": 1e-4,
        "init": "kaiming",
        "rslora": True,
        "alpha": 4,
        "clip_model": str(tiny_clip(tmp_path / "clip")),
        "eval_samples": 2,
        "sample_steps": 2,
        "save_dtype": "bf16",
    }
    quiet = {"models_dir": loraswap_home / "models", "echo": lambda *_: None}
    first = train(make_config(mixed_sizes, tmp_path / "a", **options), **quiet)
    assert first.report is not None and first.adapter_path is not None
    assert sorted(first.plan["sizes"]) == [(24, 40), (32, 32), (40, 24)]
    assert first.plan["mixed_precision"] == "bf16" and first.plan["weight_dtype"] == "bfloat16"
    assert first.report["hyperparameters"]["prediction_type_effective"] == "v_prediction"
    assert first.report["inference"]["width"] == 32 and first.report["inference"]["height"] == 32
    clip = first.report["evaluation"]["clip_score"]
    assert isinstance(clip["base"], float) and isinstance(clip["adapter"], float)
    tensors, _ = read_adapter(first.adapter_path)
    assert any(k.startswith("text_encoder.") for k in tensors)
    conv = next(v for k, v in tensors.items() if k.endswith("conv1.lora_A.weight"))
    assert conv.dim() == 4  # LoCon-style conv LoRA exported in the canonical layout
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert first.report["cache"]["misses"] > 0
    cheaper = options | {"steps": 1, "clip_model": None, "eval_samples": 0, "sample_steps": 1}
    second = train(make_config(mixed_sizes, tmp_path / "b", **cheaper), **quiet)
    assert second.report is not None
    assert second.report["cache"]["misses"] == 0 and second.report["cache"]["hits"] == 10  # latents reused


def test_dora_trains_without_export(loraswap_home: Path, mixed_sizes: Path, tmp_path: Path) -> None:
    config = make_config(
        mixed_sizes, tmp_path / "dora", steps=1, dora=True, export=False, eval_samples=0, sample_steps=1
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.adapter_path is None and result.report is not None and "adapter" not in result.report
    saved = load_file(resolve_resume("latest", tmp_path / "dora") / "adapter.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved)


def test_fp16_on_cpu_falls_back_with_a_warning() -> None:
    config = build_config({"data": "d", "output": "o", "mixed_precision": "fp16"})
    with pytest.warns(UserWarning, match="fp16 mixed precision needs CUDA"):
        weights, amp, mode = precision(config, torch.device("cpu"))
    assert (weights, amp, mode) == (torch.float32, None, "no")
    bf16 = build_config({"data": "d", "output": "o", "mixed_precision": "bf16"})
    assert precision(bf16, torch.device("cpu")) == (torch.bfloat16, torch.bfloat16, "bf16")


def test_no_validation_set(loraswap_home: Path, tmp_path: Path) -> None:
    synth_dataset(tmp_path / "ds", n=6, style="stripes", size=32, seed=3)
    config = make_config(
        tmp_path / "ds", tmp_path / "run", steps=1, val_split=0.0, eval_samples=2, export=False
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.report is not None
    evaluation = result.report["evaluation"]
    assert evaluation["initial_val_loss"] is None and evaluation["final_val_loss"] is None
    assert evaluation["dataset_similarity"]["reference"] == "training set (no validation set)"
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"val_loss": null' in rows[1]
