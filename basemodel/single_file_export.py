"""diffusers → A1111/CivitAI/ComfyUI single-file key layouts: the inverse of ``single_file.py``.

``single_file.load_single_file`` converts LDM keys with diffusers' ``convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint`` (and, for SDXL, ``convert_open_clip_checkpoint``); this module renames
the other way, from the UNet's and VAE's configs, so that a checkpoint written here loads back through
``load_single_file`` to the same weights (tested) and opens in A1111 / ComfyUI::

    UNet  model.diffusion_model.  conv_in → input_blocks.0.0, time_embedding.linear_1/2 → time_embed.0/2,
          add_embedding.linear_1/2 → label_emb.0.0/0.2 (SDXL's text_time embedding),
          down_blocks.{i}.resnets.{j} → input_blocks.{1 + i·(L+1) + j}.0 (L = layers_per_block),
          down_blocks.{i}.attentions.{j} → input_blocks.{1 + i·(L+1) + j}.1,
          down_blocks.{i}.downsamplers.0.conv → input_blocks.{(i+1)·(L+1)}.0.op,
          mid_block.resnets.0/1 → middle_block.0/2, mid_block.attentions.0 → middle_block.1,
          up_blocks.{i}.resnets.{j} / attentions.{j} → output_blocks.{i·(L+1) + j}.0 / .1 (j ≤ L),
          up_blocks.{i}.upsamplers.0 → output_blocks.{i·(L+1) + L}.{2 with attention, else 1},
          conv_norm_out / conv_out → out.0 / out.2; in resnets norm1/conv1 → in_layers.0/2,
          norm2/conv2 → out_layers.0/3, time_emb_proj → emb_layers.1, conv_shortcut → skip_connection
    VAE   first_stage_model.  down_blocks.{i}.resnets.{j} → down.{i}.block.{j}, downsamplers.0 → downsample,
          up_blocks.{i} → up.{n-1-i} (block / upsample), mid_block.resnets.0/1 → mid.block_1/2,
          mid_block.attentions.0 → mid.attn_1 (group_norm → norm, to_q/k/v → q/k/v, to_out.0 →
          proj_out, as 1x1 convs), conv_norm_out → norm_out, conv_shortcut → nin_shortcut
    CLIP  SD1.x: cond_stage_model.transformer.text_model.<transformers' name>;
          SDXL (the SGM layout of sd_xl_base_1.0.safetensors): CLIP ViT-L under
          conditioner.embedders.0.transformer.text_model., OpenCLIP ViT-bigG under
          conditioner.embedders.1.model. in OpenCLIP's names (``open_clip_to_ldm``: q/k/v fused into
          ``attn.in_proj_*``, layer_norm1/2 → ln_1/2, mlp.fc1/fc2 → mlp.c_fc/c_proj, the projection
          transposed as ``text_projection``).

SD2.x's OpenCLIP-H encoder is not written (SD2 merges are written as diffusers folders). SD3/SD3.5 and
Flux.1 pipelines are written by their families (``basemodel.families.sd3.single_file.to_single_file``:
SAI's layout; ``basemodel.families.flux.single_file.to_single_file``: ComfyUI's all-in-one layout);
``pipeline_to_single_file`` picks the writer by the pipeline's family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from basemodel.errors import NotSupported

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' ``AdaLayerNormContinuous`` takes (scale, shift), BFL's and SAI's final layers (shift,
    scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def renamed(key: str, table: Mapping[str, str], error: str, full: str | None = None) -> str:
    """``key`` with the first matching prefix of ``table`` replaced; ``error`` (with ``{}`` for the key:
    ``full``, the whole key, when ``key`` is a block-relative part) when none matches."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise NotSupported(error.format(full or key))


def fused(parts: Mapping[str, Mapping[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fused single-file tensors (qkv, linear1) from diffusers' parts: name → place → tensor, concatenated
    in place order."""
    return {key: torch.cat([pieces[place] for place in sorted(pieces)]) for key, pieces in parts.items()}


# a transformer block kind's layout in a single file: (its blocks' prefix there, the rename table of a
# block's parts, its fused parts: diffusers part → (the fused tensor, its place in it))
BlockLayout = tuple[str, Mapping[str, str], Mapping[str, tuple[str, int]]]


def transformer_to_single_file(
    state: Mapping[str, torch.Tensor],
    top: Mapping[str, str],
    blocks: Mapping[str, BlockLayout],
    unnamed: str,
    adjust: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A diffusers MMDiT transformer's state dict → a single file's names (no ``model.diffusion_model.``
    prefix): the final AdaLN's halves swapped, top-level keys renamed by ``top``, ``<kind>.<i>.<name>``
    by ``blocks[kind]``, fused parts concatenated; ``adjust(index, part, tensor)`` may change a block's
    unfused tensor first (SD3's pre-only block). ``unnamed`` is the error for a key no table names."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith("norm_out.linear."):
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = swap_halves(tensor)
            continue
        kind, _, rest = key.partition(".")
        if kind not in blocks:
            out[renamed(key, top, unnamed)] = tensor
            continue
        prefix, table, fused_parts = blocks[kind]
        index, _, name = rest.partition(".")
        part, _, suffix = name.rpartition(".")  # attn.to_q, weight|bias
        if part in fused_parts:
            target, place = fused_parts[part]
            parts.setdefault(f"{prefix}.{index}.{target}.{suffix}", {})[place] = tensor
            continue
        if adjust is not None:
            tensor = adjust(int(index), part, tensor)
        out[f"{prefix}.{index}." + renamed(name, table, unnamed, key)] = tensor
    return out | fused(parts)


def _rename(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str] | None = None) -> str | None:
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old) :]
            for a, b in (inner or {}).items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return prefixes[old] + rest
    return None


def _layers(config: Mapping[str, Any]) -> int:
    per = config.get("layers_per_block", 2)
    if not isinstance(per, int):
        raise NotSupported(f"a UNet with per-block layer counts {per!r} has no SD1 single-file layout")
    return per


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers SD1.x UNet state dict → ``model.diffusion_model.…`` keys."""
    blocks, per = len(config["block_out_channels"]), _layers(config)
    plain = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
        "add_embedding.linear_1.": "label_emb.0.0.",
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
            slot = 2 if str(config["up_block_types"][i]).startswith("CrossAttn") else 1
            plain[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{slot}."
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        is_resnet = any(key.startswith(p) for p in resnets)
        new = _rename(key, resnets, RESNET) if is_resnet else _rename(key, plain)
        if new is None:
            raise NotSupported(f"UNet weight {key} has no SD1 single-file name")
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict → ``first_stage_model.…`` keys."""
    blocks, per = len(config["block_out_channels"]), _layers(config)
    resnets = {
        f"{part}.mid_block.resnets.{k}.": f"{part}.mid.block_{k + 1}."
        for part in ("encoder", "decoder")
        for k in (0, 1)
    }
    plain = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
        "encoder.conv_in.": "encoder.conv_in.",
        "encoder.conv_out.": "encoder.conv_out.",
        "decoder.conv_in.": "decoder.conv_in.",
        "decoder.conv_out.": "decoder.conv_out.",
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for i in range(blocks):
        for j in range(per):
            resnets[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per + 1):
            resnets[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{blocks - 1 - i}.block.{j}."
        plain[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        plain[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{blocks - 1 - i}.upsample."
    attention = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if any(key.startswith(p) for p in attention):
            new = _rename(key, attention, VAE_ATTENTION)
            tensor = tensor[..., None, None] if tensor.ndim == 2 else tensor  # LDM keeps 1x1 convs here
        elif any(key.startswith(p) for p in resnets):
            new = _rename(key, resnets, {"conv_shortcut.": "nin_shortcut."})
        else:
            new = _rename(key, plain)
        if new is None:
            raise NotSupported(f"VAE weight {key} has no SD1 single-file name")
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict (with or without ``text_model.``) → LDM keys."""
    return {
        prefix + key.removeprefix("text_model."): tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")
    }


def open_clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``CLIPTextModelWithProjection`` → OpenCLIP's names under SDXL's
    ``conditioner.embedders.1.model.``, q/k/v fused into ``in_proj``."""
    plain = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}
    out: dict[str, torch.Tensor] = {"text_projection": plain["text_projection.weight"].T}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in plain.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = tensor
            continue
        if not key.startswith("encoder.layers."):
            continue
        layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
        prefix = f"transformer.resblocks.{layer}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            part, kind = rest.removeprefix("self_attn.").split(".")  # q_proj, weight|bias
            fused.setdefault(f"{prefix}attn.in_proj_{kind}", {})[part[0]] = tensor
            continue
        new = _rename(rest, OPENCLIP_LAYER)
        if new is None:
            raise NotSupported(f"OpenCLIP text encoder weight {key} has no single-file name")
        out[prefix + new] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {SDXL_OPENCLIP_PREFIX + key: tensor for key, tensor in out.items()}


def text_encoder_to_file(model: torch.nn.Module, prefix: str, *, clip: bool) -> dict[str, torch.Tensor]:
    """A transformers text encoder in its own names under ``prefix`` (ComfyUI's and SAI's
    ``text_encoders.<name>.transformer.`` layout; CLIP's under ``text_model.``). CLIP's position ids and
    T5's second reference to its tied token embedding are left out (loaders restore both)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("position_ids") or key == "encoder.embed_tokens.weight":
            continue
        nested = clip and not key.startswith(("text_model.", "text_projection."))
        out[prefix + ("text_model." if nested else "") + key] = tensor
    return out


# the families whose single files are written here and load back through ``basemodel.single_file``
WRITABLE_FAMILIES = ("sd1", "sdxl", "sd3", "flux")


def pipeline_to_single_file(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline in its family's single-file layout: SD1.x's LDM, SDXL's SGM, SD3's SAI layout or
    Flux's ComfyUI all-in-one layout (a family outside ``WRITABLE_FAMILIES`` is ``NotSupported``)."""
    from basemodel.families import detect_pipeline
    from basemodel.families.flux import single_file as flux_file
    from basemodel.families.sd3 import single_file as sd3_file

    writers = {"sd3": sd3_file.to_single_file, "flux": flux_file.to_single_file}
    family = detect_pipeline(pipe).name
    if family not in WRITABLE_FAMILIES:
        raise NotSupported(
            f"single-file output is not written for {family} models", hint="Use --format diffusers."
        )
    return writers[family](pipe) if family in writers else pipeline_to_ldm(pipe)


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """An SD1.x ``StableDiffusionPipeline`` → one A1111-layout state dict, or an SDXL
    ``StableDiffusionXLPipeline`` (two text encoders, the second with a projection) → the SGM layout;
    contiguous tensors."""
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
    }
    second = getattr(pipe, "text_encoder_2", None)
    if second is None:
        state |= clip_to_ldm(pipe.text_encoder.state_dict())
    elif hasattr(second, "text_projection"):
        state |= clip_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_PREFIX)
        state |= open_clip_to_ldm(second.state_dict())
    else:
        raise NotSupported(
            "single-file output is written for SD1.x and SDXL models; this model's second text encoder "
            "has no projection",
            hint="Use --format diffusers.",
        )
    return {key: tensor.detach().contiguous() for key, tensor in state.items()}
