"""``tiny-flux-random``: a Flux.1-dev-shaped ``FluxPipeline`` with random weights from a seed.

For tests and benchmarks of the Flux paths on a CPU. Module names and structure follow Flux.1:
a ``FluxTransformer2DModel`` with one double-stream (``transformer_blocks``) and one single-stream
(``single_transformer_blocks``) block, 2 heads of 8, RoPE axes (2, 2, 4), the guidance embedding
(``guidance_embeds``: dev; ``--schnell`` builds one without), CLIP-L's pooled output as the pooled
projection (the offline CLIP BPE tokenizer, 32 wide) and a 1-layer T5 encoder (32 wide) with a T5
Unigram tokenizer built in code from the same word list; an AutoencoderKL with Flux's scaling and shift
factors and no quant convs; FlowMatchEuler with Flux-dev's scheduler config. Only widths and depths
are small: 32 px images, 16×16×4 latents packed into 64 tokens of 16 channels. The same seed always
gives byte-identical files; nothing is downloaded. It draws noise, not pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from basemodel.atomic import staged_folder
from basemodel.families.t5 import build_t5_tokenizer
from basemodel.tiny import DEFAULT_SEED, RESOLUTION, clip_text_config
from basemodel.tokenizer import build_tokenizer

FLUX_RANDOM_NAME = "tiny-flux-random"
FLUX_VAE = (0.3611, 0.1159)  # Flux.1's VAE: scaling_factor, shift_factor
LATENT_CHANNELS = 4  # Flux.1: 16
CLIP_WIDTH = 32  # CLIP-L: 768 (its pooled output is Flux's pooled projection)
T5_WIDTH = 32  # T5-XXL: 4096

# Flux.1-dev's scheduler_config.json (schnell: shift 1.0, no dynamic shifting).
FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def build_flux_transformer(seed: int, *, guidance: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    )


def build_flux_vae(
    seed: int, *, scaling_factor: float, shift_factor: float, latent_channels: int = LATENT_CHANNELS
) -> AutoencoderKL:
    """A factor-2 VAE without quant convs (as Flux's and SD3's), with the family's scaling and shift."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def build_t5(vocab_size: int, seed: int, width: int = T5_WIDTH) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (T5-XXL): gated GELU
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config).eval()


def build_tiny_flux_pipeline(seed: int = DEFAULT_SEED, *, schnell: bool = False) -> Any:
    """The random Flux-shaped pipeline (dev; ``schnell``: no guidance embedding), CPU, fp32, from ``seed``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        clip_text_config(
            tokenizer, hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH, num_attention_heads=2
        )
    )
    tokenizer_2 = build_t5_tokenizer()
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            **(FLUX_SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER)
        ),
        vae=build_flux_vae(seed + 1, scaling_factor=FLUX_VAE[0], shift_factor=FLUX_VAE[1]),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=build_t5(len(tokenizer_2), seed + 3),
        tokenizer_2=tokenizer_2,
        transformer=build_flux_transformer(seed, guidance=not schnell),
    )
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def save_tiny_flux(output: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build ``tiny-flux-random`` and save it in diffusers format; the folder appears atomically."""
    output = Path(output)
    with staged_folder(output) as staging:
        build_tiny_flux_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    return output
