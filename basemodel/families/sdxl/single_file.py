"""SDXL single-file checkpoints (SGM layout): the two text encoders and the pipeline.

``basemodel.single_file`` reads and checks the file and converts the UNet and the VAE (SGM's UNet
keys are LDM's, with ``label_emb`` for the ``text_time`` embedding); this module converts the text
encoders — CLIP ViT-L under ``conditioner.embedders.0.transformer.`` (transformers' names) and
OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (OpenCLIP's names: fused ``in_proj``
q/k/v, ``text_projection`` transposed; diffusers' ``convert_open_clip_checkpoint``) — and assembles a
``StableDiffusionXLPipeline`` with the config folder's tokenizers and scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from basemodel.families import read_index, read_json
from basemodel.single_file_parts import (
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    assign_weights,
    clip_text_encoder,
    converted,
    load_scheduler,
    load_tokenizer,
    subset,
)

# SDXL's single-file component key prefixes, in words (what a checkpoint must have)
SDXL_COMPONENTS = {
    UNET_PREFIX: "UNet",
    VAE_PREFIX: "VAE",
    SDXL_CLIP_PREFIX: "CLIP ViT-L text encoder",
    SDXL_OPENCLIP_PREFIX: "OpenCLIP ViT-bigG text encoder",
}


def assemble_sdxl(
    state: dict[str, torch.Tensor],
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    config_dir: Path,
    path: Path,
    torch_dtype: torch.dtype,
) -> StableDiffusionXLPipeline:
    text_encoder = clip_text_encoder(state, SDXL_CLIP_PREFIX, config_dir / "text_encoder", path, torch_dtype)
    text_encoder_2 = open_clip_text_encoder(state, config_dir / "text_encoder_2", path, torch_dtype)
    index = read_index(config_dir)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_tokenizer(config_dir / "tokenizer"),
        tokenizer_2=load_tokenizer(config_dir / "tokenizer_2"),
        unet=unet,
        scheduler=load_scheduler(config_dir / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )


def open_clip_text_encoder(
    state: dict[str, torch.Tensor], config_folder: Path, path: Path, torch_dtype: torch.dtype
) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig.from_dict(read_json(config_folder / "config.json"))
    with init_empty_weights():
        model = CLIPTextModelWithProjection(config)
    component = "OpenCLIP text encoder"
    weights = subset(state, SDXL_OPENCLIP_PREFIX)
    keys = converted(component, path, convert_open_clip_checkpoint, model, weights, SDXL_OPENCLIP_PREFIX)
    if not hasattr(model, "text_model"):  # a flattened layout (no text_model level)
        keys = {k.removeprefix("text_model."): v for k, v in keys.items()}
    assign_weights(model, keys, component, path, torch_dtype)
    return model
