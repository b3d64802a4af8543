"""``tiny-sdxl-random``: an SDXL-shaped ``StableDiffusionXLPipeline`` with random weights from a seed.

For tests and benchmarks of the SDXL paths on a CPU. Module names and structure follow SDXL base: a
plain ``DownBlock2D`` first, then cross-attention blocks whose transformer depth differs per block (1 in
``down_blocks.1``, 2 in ``down_blocks.2`` and the mid block, as SDXL's 2 and 10), ``text_time`` added
conditioning, linear projections in the transformers, two CLIP text encoders (the second a
``CLIPTextModelWithProjection`` with GELU, like OpenCLIP ViT-bigG) sharing the offline tokenizer, an
Euler scheduler with SDXL's config and a VAE with SDXL's scaling factor. Only widths and depths are
small: 32 px images, 16×16×4 latents, 32- and 64-wide text encoders (96-wide context), a 48-wide
pooled projection. The same seed always gives byte-identical files; nothing is downloaded. It draws
noise, not pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from basemodel.atomic import staged_folder
from basemodel.tiny import DEFAULT_SEED, LATENT_SIZE, build_vae, clip_text_config
from basemodel.tokenizer import build_tokenizer

__all__ = ["SDXL_RANDOM_NAME", "build_tiny_sdxl_pipeline", "save_tiny_sdxl"]

SDXL_RANDOM_NAME = "tiny-sdxl-random"
SDXL_VAE_SCALING = 0.13025
TEXT_WIDTHS = (32, 64)  # text_encoder, text_encoder_2 (SDXL: 768, 1280)
PROJECTION = 48  # text_encoder_2's pooled projection (SDXL: 1280)
TIME_EMBED = 8  # per time id (SDXL: 256)

# SDXL base's scheduler_config.json (the values EulerDiscreteScheduler takes).
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def build_sdxl_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
        norm_num_groups=32,
    )


def build_sdxl_text_encoders(
    tokenizer: CLIPTokenizer, seed: int
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    first, second = TEXT_WIDTHS
    torch.manual_seed(seed)
    one = CLIPTextModel(
        clip_text_config(tokenizer, hidden_size=first, intermediate_size=4 * first, num_attention_heads=2)
    )
    torch.manual_seed(seed + 1)
    two = CLIPTextModelWithProjection(
        clip_text_config(
            tokenizer,
            hidden_size=second,
            intermediate_size=4 * second,
            num_attention_heads=4,
            projection_dim=PROJECTION,
            hidden_act="gelu",
        )
    )
    return one, two


def build_tiny_sdxl_pipeline(seed: int = DEFAULT_SEED) -> Any:
    """The random SDXL-shaped pipeline, on CPU in fp32, from ``seed``; progress bars off."""
    tokenizer = build_tokenizer()
    text_encoder, text_encoder_2 = build_sdxl_text_encoders(tokenizer, seed + 2)
    pipe: Any = StableDiffusionXLPipeline(
        vae=build_vae(seed + 1, scaling_factor=SDXL_VAE_SCALING),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=build_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl(output: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build ``tiny-sdxl-random`` and save it in diffusers format; the folder appears atomically."""
    output = Path(output)
    with staged_folder(output) as staging:
        build_tiny_sdxl_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    return output
