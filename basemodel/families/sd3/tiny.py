"""``tiny-sd3-random``: an SD3.5-medium-shaped ``StableDiffusion3Pipeline`` with random weights from a seed.

For tests and benchmarks of the SD3 paths on a CPU. Module names and structure follow SD3.5 medium: an
``SD3Transformer2DModel`` with two joint blocks, the first with SD3.5's dual attention
(``dual_attention_layers``) and every block with RMS QK norm (``qk_norm``); two
``CLIPTextModelWithProjection`` encoders (CLIP-L and a GELU CLIP-G, sharing the offline CLIP BPE
tokenizer) and a 1-layer T5 (the offline Unigram tokenizer); an AutoencoderKL with SD3's scaling and
shift factors and no quant convs; FlowMatchEuler with SD3's static shift 3.0. Only widths and depths are
small: 32 px images, 16×16×4 latents in 2×2 patches, 32-wide CLIPs padded to the 64-wide T5 context.
The same seed always gives byte-identical files; nothing is downloaded. It draws noise, not pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from basemodel.atomic import staged_folder
from basemodel.families.flux.tiny import build_flux_vae, build_t5
from basemodel.families.t5 import build_t5_tokenizer
from basemodel.tiny import DEFAULT_SEED, LATENT_SIZE, clip_text_config
from basemodel.tokenizer import build_tokenizer

SD3_RANDOM_NAME = "tiny-sd3-random"
SD3_VAE = (1.5305, 0.0609)  # SD3's VAE: scaling_factor, shift_factor
CLIP_WIDTHS = (32, 32)  # CLIP-L, CLIP-G (SD3: 768, 1280)
PROJECTION = 32  # each CLIP's pooled projection (SD3: 768, 1280 → pooled_projection_dim 2048)
T5_WIDTH = 64  # T5-XXL: 4096 (the joint attention width; the CLIPs' concatenation is padded to it)
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def build_sd3_transformer(seed: int, *, sd35: bool = True) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=2 * PROJECTION,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )


def build_sd3_text_encoders(
    tokenizer: Any, seed: int
) -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    encoders = []
    for i, (width, act) in enumerate(zip(CLIP_WIDTHS, ("quick_gelu", "gelu"), strict=True)):
        torch.manual_seed(seed + i)
        config = clip_text_config(
            tokenizer,
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=2,
            projection_dim=PROJECTION,
            hidden_act=act,
        )
        encoders.append(CLIPTextModelWithProjection(config))
    return encoders[0], encoders[1]


def build_tiny_sd3_pipeline(seed: int = DEFAULT_SEED, *, sd35: bool = True, t5: bool = True) -> Any:
    """The random SD3.5-shaped pipeline (``sd35=False``: SD3's transformer; ``t5=False``: no
    ``text_encoder_3``), on CPU in fp32, from ``seed``; progress bars off."""
    tokenizer = build_tokenizer()
    text_encoder, text_encoder_2 = build_sd3_text_encoders(tokenizer, seed + 2)
    tokenizer_3 = build_t5_tokenizer()
    pipe: Any = StableDiffusion3Pipeline(
        transformer=build_sd3_transformer(seed, sd35=sd35),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=build_flux_vae(seed + 1, scaling_factor=SD3_VAE[0], shift_factor=SD3_VAE[1]),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer(),
        text_encoder_3=build_t5(len(tokenizer_3), seed + 4, width=T5_WIDTH) if t5 else None,
        tokenizer_3=tokenizer_3 if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def save_tiny_sd3(output: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build ``tiny-sd3-random`` and save it in diffusers format; the folder appears atomically."""
    output = Path(output)
    with staged_folder(output) as staging:
        build_tiny_sd3_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    return output
