"""The embedded base model ``tiny-sd``: a small StableDiffusionPipeline that follows simple prompts.

``tiny-sd`` is the pretrained model shipped in ``basemodel/weights/tiny-sd`` (fp16 safetensors made by
``loraswap model pretrain-tiny``; docs/tiny-sd.md). It draws "a {colour} {shape} on a {colour}
background" at 32 px. ``ensure_tiny`` installs it, sha256-checked, under ``$LORASWAP_HOME/models`` on
first use; nothing is trained or downloaded at start-up.

``tiny-sd-random`` (``loraswap model init-tiny --random``) is the same architecture with random weights
built from a seed; the same seed always gives byte-identical weight files. ``tiny-sd-inpaint-random``
is its inpainting counterpart: a ``StableDiffusionInpaintPipeline`` folder whose UNet takes 9 input
channels (latents, mask, masked-image latents), as SD1.5's inpainting checkpoint. The other families'
random models (``tiny-sdxl-random``, ``tiny-sd3-random``, ``tiny-flux-random``) live in their family
packages and build on this module's VAE and CLIP parts; ``basemodel.random_models`` lists them all.

Module names follow SD1.5 (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` …) so
adapters, converters and tests exercise the same paths as on a full model; only widths and depths
are small: a UNet2DConditionModel (CrossAttn down/up blocks) on 16×16×4 latents, an AutoencoderKL
with factor-2 downsampling and 4 latent channels, a 2-layer 64-wide CLIPTextModel, and DDIM with
SD1.5's schedule constants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from basemodel.atomic import staged_folder
from basemodel.tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer

TINY_NAME = "tiny-sd"
RANDOM_NAME = "tiny-sd-random"
INPAINT_RANDOM_NAME = "tiny-sd-inpaint-random"
INPAINT_CHANNELS = 9  # latents (4) + mask (1) + masked-image latents (4)
DEFAULT_SEED = 0
RESOLUTION = 32
LATENT_SIZE = RESOLUTION // 2

# SD1.5's scheduler constants: the noise schedule is the model's contract, so keep it exact.
SD15_VAE_SCALING = 0.18215
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


def build_unet(seed: int, in_channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_vae(seed: int, scaling_factor: float = SD15_VAE_SCALING) -> AutoencoderKL:
    """Factor-2 VAE with 4 latent channels; ``scaling_factor`` as the full-size family's VAE."""
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
        scaling_factor=scaling_factor,
    )


def clip_text_config(tokenizer: CLIPTokenizer, **sizes: Any) -> CLIPTextConfig:
    """A CLIP text config sized to ``tokenizer``; ``sizes`` override the 2-layer, 64-wide default."""
    bos, eos = (int(tokenizer.convert_tokens_to_ids(token)) for token in (BOS, EOS))  # type: ignore[arg-type]
    shape = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        **(shape | sizes),
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text encoder sized to ``tokenizer``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return CLIPTextModel(clip_text_config(tokenizer))


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any = None) -> Any:
    """A StableDiffusionPipeline from parts, no safety checker, progress bars off; ``scheduler`` defaults
    to DDIM with SD1.5's schedule."""
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler if scheduler is not None else DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = DEFAULT_SEED) -> Any:
    """The random-init pipeline (the shipped model's architecture), on CPU in fp32, from ``seed``."""
    tokenizer = build_tokenizer()
    return assemble_pipeline(
        build_vae(seed + 1), build_text_encoder(tokenizer, seed + 2), tokenizer, build_unet(seed)
    )


def build_tiny_inpaint_pipeline(seed: int = DEFAULT_SEED) -> Any:
    """``tiny-sd-random`` with a 9-channel (inpainting) UNet, as a ``StableDiffusionInpaintPipeline``."""
    from diffusers import StableDiffusionInpaintPipeline

    tokenizer = build_tokenizer()
    pipe: Any = StableDiffusionInpaintPipeline(
        vae=build_vae(seed + 1),
        text_encoder=build_text_encoder(tokenizer, seed + 2),
        tokenizer=tokenizer,
        unet=build_unet(seed, in_channels=INPAINT_CHANNELS),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_inpaint(output: Path, seed: int = DEFAULT_SEED) -> Path:
    output = Path(output)
    with staged_folder(output) as staging:
        build_tiny_inpaint_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    return output


def save_tiny(output: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build the random-init variant and save it in diffusers format; the folder appears atomically."""
    output = Path(output)
    with staged_folder(output) as staging:
        build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
    return output


def ensure_tiny(models_dir: Path) -> Path:
    """The installed pretrained ``tiny-sd`` under ``models_dir``, (re)installed when missing or stale."""
    from basemodel.pretrain.shipped import ensure_installed

    return ensure_installed(Path(models_dir) / TINY_NAME)
