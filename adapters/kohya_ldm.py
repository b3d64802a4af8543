"""kohya's SGM/LDM UNet names ↔ diffusers module names, as a pure function of the UNet's config.

kohya sd-scripts trains SDXL on the SGM (LDM) UNet, so SDXL LoRAs name UNet modules the LDM way
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); some SD1.x tools do the same. LDM
numbers its blocks differently from diffusers, and how depends on the model: the table is derived
from ``block_out_channels``, ``down_block_types``, ``up_block_types``, ``layers_per_block``,
``transformer_layers_per_block`` (and ``reverse_transformer_layers_per_block``), ``mid_block_type``
and ``addition_embed_type`` — exactly as ``UNet2DConditionModel.__init__`` builds its blocks, never
guessed from the names::

    input_blocks.0.0               conv_in
    input_blocks.{i}.0.<resnet>    down_blocks.{b}.resnets.{l}.<resnet>      i = 1, 2, … over all layers
    input_blocks.{i}.1.<attn>      down_blocks.{b}.attentions.{l}.<attn>     cross-attention blocks only
    input_blocks.{i}.0.op          down_blocks.{b}.downsamplers.0.conv       after every block but the last
    middle_block.0 / 1 / 2         mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{i}.0.<resnet>   up_blocks.{b}.resnets.{l}.<resnet>        i = 0, 1, … over all layers
    output_blocks.{i}.1.<attn>     up_blocks.{b}.attentions.{l}.<attn>       cross-attention blocks only
    output_blocks.{i}.{1|2}.conv   up_blocks.{b}.upsamplers.0.conv           last layer of every block but
                                                                             the last (1 without attention)
    out.2                          conv_out
    time_embed.0 / 2               time_embedding.linear_1 / linear_2
    label_emb.0.0 / 0.2            add_embedding.linear_1 / linear_2         addition_embed_type "text_time"

    <resnet>: in_layers.2 → conv1, out_layers.3 → conv2, emb_layers.1 → time_emb_proj,
              skip_connection → conv_shortcut (where the channel count changes)
    <attn>:   the same names on both sides: proj_in, proj_out, transformer_blocks.{t}.attn1.to_q … to_out.0,
              attn2.*, ff.net.0.proj, ff.net.2 (t < the block's transformer depth)

Only the LoRA-targetable modules (``nn.Linear`` / ``nn.Conv2d``) are listed. kohya writes the dotted
LDM path with ``_`` for ``.``; ``kohya_unet_names`` gives that form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["LDM_PREFIXES", "UnsupportedUNet", "is_ldm_name", "kohya_unet_names", "ldm_unet_names"]

# How kohya LDM/SGM UNet names begin (underscore form); diffusers-style names never begin like this.
LDM_PREFIXES = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_2")

DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type → has attention
UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_BLOCKS = {None: False, "UNetMidBlock2DCrossAttn": True}
RESNET_PARTS = (("in_layers.2", "conv1"), ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"))
SHORTCUT = ("skip_connection", "conv_shortcut")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")


class UnsupportedUNet(ValueError):
    """The UNet config has a block type the LDM layout does not describe (the message names it)."""


def is_ldm_name(kohya_name: str) -> bool:
    """Whether a kohya UNet name (after ``lora_unet_``) is in the LDM/SGM layout."""
    return kohya_name.startswith(LDM_PREFIXES)


def kohya_unet_names(config: Mapping[str, Any]) -> dict[str, str]:
    """kohya LDM name (``input_blocks_4_1_…``, no ``lora_unet_``) → diffusers module path."""
    return {ldm.replace(".", "_"): diffusers for ldm, diffusers in ldm_unet_names(config).items()}


def ldm_unet_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Dotted LDM module path → diffusers module path for every targetable UNet module."""
    table = {
        "input_blocks.0.0": "conv_in",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "out.2": "conv_out",
    }
    if config.get("addition_embed_type") == "text_time":
        table |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
    table |= dict(_down_path(config))
    table |= dict(_mid_block(config))
    table |= dict(_up_path(config))
    return table


Pairs = Iterator[tuple[str, str]]


def _down_path(config: Mapping[str, Any]) -> Pairs:
    channels = [int(c) for c in config["block_out_channels"]]
    types = list(config["down_block_types"])
    layers = _per_block(config.get("layers_per_block", 2), len(types))
    depths = _down_depths(config, layers)
    index = 1
    for block, block_type in enumerate(types):
        attention = _kind(DOWN_BLOCKS, block_type, "down block")
        in_channels = channels[max(block - 1, 0)]
        for layer in range(layers[block]):
            resnet_in = in_channels if layer == 0 else channels[block]
            diffusers = f"down_blocks.{block}"
            resnet = f"{diffusers}.resnets.{layer}"
            yield from _resnet(f"input_blocks.{index}.0", resnet, resnet_in, channels[block])
            if attention:
                depth = depths[block][layer]
                yield from _transformer(f"input_blocks.{index}.1", f"{diffusers}.attentions.{layer}", depth)
            index += 1
        if block < len(types) - 1:
            yield f"input_blocks.{index}.0.op", f"down_blocks.{block}.downsamplers.0.conv"
            index += 1


def _mid_block(config: Mapping[str, Any]) -> Pairs:
    block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if not _kind(MID_BLOCKS, block_type, "mid block"):
        return
    channels = int(config["block_out_channels"][-1])
    depth = _per_block(config.get("transformer_layers_per_block", 1), len(config["down_block_types"]))[-1]
    yield from _resnet("middle_block.0", "mid_block.resnets.0", channels, channels)
    yield from _transformer("middle_block.1", "mid_block.attentions.0", _first(depth))
    yield from _resnet("middle_block.2", "mid_block.resnets.1", channels, channels)


def _up_path(config: Mapping[str, Any]) -> Pairs:
    channels = [int(c) for c in reversed(config["block_out_channels"])]
    types = list(config["up_block_types"])
    layers = [n + 1 for n in reversed(_per_block(config.get("layers_per_block", 2), len(types)))]
    depths = _up_depths(config, layers)
    index = 0
    for block, block_type in enumerate(types):
        attention = _kind(UP_BLOCKS, block_type, "up block")
        out_channels = channels[block]
        prev_channels = channels[max(block - 1, 0)]
        skip_in = channels[min(block + 1, len(channels) - 1)]
        for layer in range(layers[block]):
            skip = skip_in if layer == layers[block] - 1 else out_channels
            resnet_in = (prev_channels if layer == 0 else out_channels) + skip
            diffusers = f"up_blocks.{block}"
            resnet = f"{diffusers}.resnets.{layer}"
            yield from _resnet(f"output_blocks.{index}.0", resnet, resnet_in, out_channels)
            if attention:
                depth = depths[block][layer]
                yield from _transformer(f"output_blocks.{index}.1", f"{diffusers}.attentions.{layer}", depth)
            if layer == layers[block] - 1 and block < len(types) - 1:
                yield f"output_blocks.{index}.{2 if attention else 1}.conv", f"{diffusers}.upsamplers.0.conv"
            index += 1


def _resnet(ldm: str, diffusers: str, in_channels: int, out_channels: int) -> Pairs:
    for ldm_part, diffusers_part in RESNET_PARTS:
        yield f"{ldm}.{ldm_part}", f"{diffusers}.{diffusers_part}"
    if in_channels != out_channels:
        yield f"{ldm}.{SHORTCUT[0]}", f"{diffusers}.{SHORTCUT[1]}"


def _transformer(ldm: str, diffusers: str, depth: int) -> Pairs:
    parts = ["proj_in", "proj_out"]
    for t in range(depth):
        block = f"transformer_blocks.{t}"
        parts += [f"{block}.{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ATTENTION_PROJECTIONS]
        parts += [f"{block}.{ff}" for ff in FEED_FORWARD]
    for part in parts:
        yield f"{ldm}.{part}", f"{diffusers}.{part}"


def _kind(known: Mapping[Any, bool], block_type: Any, what: str) -> bool:
    if block_type not in known:
        raise UnsupportedUNet(
            f"the UNet has a {what} of type {block_type!r}; LDM names are defined for "
            f"{', '.join(sorted(str(k) for k in known if k))}"
        )
    return known[block_type]


def _per_block(value: Any, blocks: int) -> list[Any]:
    """An int or a per-block sequence (as ``UNet2DConditionModel`` accepts) → one entry per block."""
    if isinstance(value, int):
        return [value] * blocks
    values = list(value)
    if len(values) != blocks:
        raise UnsupportedUNet(f"{values} has {len(values)} entries for {blocks} blocks")
    return values


def _per_layer(value: Any, layers: int) -> list[int]:
    """A block's transformer depth: an int for every layer, or one int per layer."""
    if isinstance(value, int):
        return [value] * layers
    values = [int(v) for v in value]
    if len(values) != layers:
        raise UnsupportedUNet(f"transformer depths {values} do not match {layers} layers")
    return values


def _first(value: int | Sequence[int]) -> int:
    return value if isinstance(value, int) else int(value[0])


def _down_depths(config: Mapping[str, Any], layers: list[int]) -> list[list[int]]:
    per_block = _per_block(config.get("transformer_layers_per_block", 1), len(layers))
    return [_per_layer(value, n) for value, n in zip(per_block, layers, strict=True)]


def _up_depths(config: Mapping[str, Any], layers: list[int]) -> list[list[int]]:
    reverse = config.get("reverse_transformer_layers_per_block")
    if reverse is None:
        reverse = list(reversed(_per_block(config.get("transformer_layers_per_block", 1), len(layers))))
    per_block = _per_block(reverse, len(layers))
    return [_per_layer(value, n) for value, n in zip(per_block, layers, strict=True)]
