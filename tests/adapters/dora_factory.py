"""DoRA files built in code against a base model's weights — kohya/LyCORIS (``dora_scale`` along either
axis) and PEFT (``lora_magnitude_vector``) — and the DoRA weight written out independently of
``adapters.delta`` (fp64, norms as explicit sums of squares), for merged-by-hand references."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

RANK, ALPHA = 4, 2.0

# A linear attention projection, a feed-forward, a 1x1 conv, a 3x3 resnet conv, a text-encoder linear.
SD1_TARGETS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "text_encoder.encoder.layers.0.self_attn.q_proj",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _halves(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = shape[2:]
    down = torch.randn(RANK, shape[1], *kernel, generator=gen) * 0.3
    up = torch.randn(shape[0], RANK, *([1, 1] if kernel else []), generator=gen) * 0.3
    return down, up


def _axis_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖weight‖ per output row (``out``, shape [out, 1, …]) or per input column (``in``, [1, in, …])."""
    squares = weight.double() ** 2
    if axis == "out":
        return squares.sum(dim=tuple(range(1, weight.dim())), keepdim=True).sqrt()
    dims = (0, *range(2, weight.dim()))
    return squares.sum(dim=dims, keepdim=True).sqrt()


def kohya_dora(
    weights: Mapping[str, torch.Tensor],
    kohya_name: Callable[[str], str],
    *,
    axis: str = "in",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A LyCORIS-style DoRA (rank 4, alpha 2) on ``weights`` (module → base weight): ``dora_scale`` is
    the base weight's norm along ``axis`` perturbed by ±30%, shaped ``[1, in, 1…]`` or ``[out, 1, 1…]``."""
    gen = _gen(seed)
    out: dict[str, torch.Tensor] = {}
    for module, weight in weights.items():
        name = kohya_name(module)
        down, up = _halves(tuple(weight.shape), gen)
        norm = _axis_norm(weight, axis).float()
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
        out[f"{name}.dora_scale"] = norm * (1 + 0.3 * torch.rand(norm.shape, generator=gen))
    return out


def peft_dora(weights: Mapping[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT DoRA state dict as diffusers saves it (``<component>.<module>.lora_A.weight`` …,
    ``lora_magnitude_vector`` ``[out]`` — ``[1, out, 1, 1]`` for convs, as PEFT keeps it); alpha = rank."""
    gen = _gen(seed)
    out: dict[str, torch.Tensor] = {}
    for module, weight in weights.items():
        down, up = _halves(tuple(weight.shape), gen)
        norm = _axis_norm(weight, "out").float().reshape(-1)
        magnitude = norm * (1 + 0.3 * torch.rand(norm.shape, generator=gen))
        out[f"{module}.lora_A.weight"] = down
        out[f"{module}.lora_B.weight"] = up
        out[f"{module}.lora_magnitude_vector"] = (
            magnitude if weight.dim() == 2 else magnitude.view(1, -1, 1, 1)
        )
    return out


def lora_product(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)).reshape(shape)


def kohya_weight(weight: torch.Tensor, parts: Mapping[str, torch.Tensor], s: float) -> torch.Tensor:
    """ComfyUI's rule: ``W + s·(m ⊙ V / ‖V‖ − W)``, ``V = W + (alpha/r)·up·down``, the axis read from the
    shape of ``dora_scale``."""
    base = weight.double()
    merged = base + lora_product(parts["lora_down.weight"], parts["lora_up.weight"], tuple(base.shape)) * (
        float(parts["alpha"]) / RANK
    )
    scale = parts["dora_scale"].double()
    axis = "out" if scale.shape[0] == base.shape[0] and scale.shape[0] != 1 else "in"
    shaped = scale.reshape(_axis_norm(merged, axis).shape)
    dora = merged * shaped / _axis_norm(merged, axis)
    return base + s * (dora - base)


def peft_weight(weight: torch.Tensor, parts: Mapping[str, torch.Tensor], s: float) -> torch.Tensor:
    """PEFT's ``use_dora`` at scaling ``s`` (alpha = rank): ``m ⊙ V / ‖V‖`` per output row,
    ``V = W + s·up·down``."""
    base = weight.double()
    merged = base + s * lora_product(parts["lora_A.weight"], parts["lora_B.weight"], tuple(base.shape))
    norm = _axis_norm(merged, "out")
    return merged * parts["lora_magnitude_vector"].double().reshape(norm.shape) / norm


def reference_weights(
    tensors: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    s: float,
    kohya_name: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """module → the DoRA weight at ``s`` (fp64) for a file from ``kohya_dora`` (pass its ``kohya_name``)
    or ``peft_dora``."""
    out: dict[str, torch.Tensor] = {}
    for module, weight in weights.items():
        prefix = f"{kohya_name(module)}." if kohya_name is not None else f"{module}."
        parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        rule = kohya_weight if kohya_name is not None else peft_weight
        out[module] = rule(weight, parts, s)
    return out


def base_weights(components: Mapping[str, torch.nn.Module], targets: list[str]) -> dict[str, torch.Tensor]:
    """module → a detached copy of its base weight."""
    out = {}
    for module in targets:
        component, path = module.split(".", 1)
        weight = components[component].get_submodule(path).weight
        assert isinstance(weight, torch.Tensor)
        out[module] = weight.detach().clone()
    return out


def flat(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


# Fused modules of the transformer families (kohya/ComfyUI names of the original model → the base's own
# modules, whose weights are the fused weight's rows in this order), written out here rather than read
# from the families' tables.
def flux_sources(double: int = 0, single: int = 0) -> dict[str, list[str]]:
    d, s = f"transformer.transformer_blocks.{double}", f"transformer.single_transformer_blocks.{single}"
    return {
        f"lora_unet_double_blocks_{double}_img_attn_qkv": [
            f"{d}.attn.to_q",
            f"{d}.attn.to_k",
            f"{d}.attn.to_v",
        ],
        f"lora_unet_double_blocks_{double}_txt_attn_qkv": [
            f"{d}.attn.add_q_proj",
            f"{d}.attn.add_k_proj",
            f"{d}.attn.add_v_proj",
        ],
        f"lora_unet_single_blocks_{single}_linear1": [
            f"{s}.attn.to_q",
            f"{s}.attn.to_k",
            f"{s}.attn.to_v",
            f"{s}.proj_mlp",
        ],
        f"lora_unet_double_blocks_{double}_img_attn_proj": [f"{d}.attn.to_out.0"],
        f"lora_unet_single_blocks_{single}_linear2": [f"{s}.proj_out"],
    }


def sd3_sources(block: int = 0, dual: bool = True) -> dict[str, list[str]]:
    j, t = f"lora_unet_joint_blocks_{block}", f"transformer.transformer_blocks.{block}"
    sources = {
        f"{j}_x_block_attn_qkv": [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"],
        f"{j}_context_block_attn_qkv": [
            f"{t}.attn.add_q_proj",
            f"{t}.attn.add_k_proj",
            f"{t}.attn.add_v_proj",
        ],
        f"{j}_x_block_mlp_fc1": [f"{t}.ff.net.0.proj"],
    }
    if dual:
        sources[f"{j}_x_block_attn2_qkv"] = [f"{t}.attn2.to_q", f"{t}.attn2.to_k", f"{t}.attn2.to_v"]
    return sources


def fused_weights(
    weights: Mapping[str, torch.Tensor], sources: Mapping[str, list[str]]
) -> dict[str, torch.Tensor]:
    """source name → its fused weight: the parts' base weights stacked row-wise."""
    return {name: torch.cat([weights[m] for m in parts]) for name, parts in sources.items()}


def split_back(
    fused: Mapping[str, torch.Tensor], sources: Mapping[str, list[str]], weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """source name → fused weight (e.g. the DoRA weight) → module → its rows."""
    out: dict[str, torch.Tensor] = {}
    for name, parts in sources.items():
        chunks = torch.split(fused[name], [weights[m].shape[0] for m in parts])
        out |= dict(zip(parts, chunks, strict=True))
    return out


def fused_reference(
    tensors: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    sources: Mapping[str, list[str]],
    s: float,
) -> dict[str, torch.Tensor]:
    """module → the DoRA weight at ``s`` (fp64) of a ``kohya_dora`` file on the fused ``sources``: the
    DoRA of each fused weight (ComfyUI's rule), its rows split back."""
    fused = fused_weights(weights, sources)
    return split_back(reference_weights(tensors, fused, s, lambda name: name), sources, weights)
