"""The embedded model's architecture: SD1.5 classes and module names, small widths, 32 px.

UNet2DConditionModel (CrossAttn down/up blocks) on 16×16×4 latents, an AutoencoderKL with a
factor-2 downsampling and 4 latent channels, a 2-layer 64-wide CLIPTextModel, DDIM with SD1.5's
schedule constants.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from basemodel import tiny
from basemodel.tiny import assemble_pipeline as assemble
from basemodel.tokenizer import build_tokenizer

RESOLUTION = 32
LATENT_SIZE = RESOLUTION // 2


def build_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    text_encoder: CLIPTextModel = tiny.build_text_encoder(
        tokenizer, seed, hidden_size=64, intermediate_size=256
    )
    return text_encoder


def build_pipeline(seed: int = 0) -> Any:
    """The random-init pipeline (fp32, CPU), byte-identical for the same seed."""
    tokenizer = build_tokenizer()
    return assemble(build_vae(seed + 1), build_text_encoder(tokenizer, seed + 2), tokenizer, build_unet(seed))
