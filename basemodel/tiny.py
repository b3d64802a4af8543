"""The embedded base model ``tiny-sd``: a real, small StableDiffusionPipeline built from a seed.

Module names follow SD1.5 (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` …) so
adapters, converters and tests exercise the same paths as on a full model; only widths and depths
are small. The same seed always gives byte-identical weight files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from basemodel.tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer

TINY_NAME = "tiny-sd"
DEFAULT_SEED = 0

# SD1.5's scheduler constants: the noise schedule is the model's contract, so keep it exact.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_tiny_pipeline(seed: int = DEFAULT_SEED) -> Any:
    """Build the random-init tiny pipeline deterministically on CPU in fp32."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = build_text_encoder(tokenizer, seed + 2, hidden_size=32, intermediate_size=64)
    return assemble_pipeline(vae, text_encoder, tokenizer, unet)


def build_text_encoder(tokenizer: Any, seed: int, *, hidden_size: int, intermediate_size: int) -> Any:
    """A 2-layer CLIP text encoder sized to ``tokenizer``, initialised from ``seed``."""
    bos, eos = (int(tokenizer.convert_tokens_to_ids(token)) for token in (BOS, EOS))
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """A StableDiffusionPipeline from parts, with SD1.5's DDIM schedule and no safety checker."""
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(output: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build and save tiny-sd in diffusers format; the folder appears atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def ensure_tiny(models_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    """Return the tiny-sd folder under ``models_dir``, building it on first use."""
    target = Path(models_dir) / TINY_NAME
    if not (target / "model_index.json").is_file():
        save_tiny(target, seed)
    return target
