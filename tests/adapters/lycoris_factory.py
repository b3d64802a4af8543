"""LyCORIS adapter files (LoHa, LoKr, full diff) for tiny-sd built in code, with kohya/LyCORIS names,
and their ΔW computed independently of ``adapters.delta`` (loops and block assembly, the LyCORIS
formulas written out), for merged-by-hand references."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# Targets: attention projections, a feed-forward, a 1x1 proj conv, 3x3 resnet convs, text-encoder MLP.
UNET = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "unet.mid_block.resnets.0.conv2",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
]
TEXT = ["text_encoder.encoder.layers.0.mlp.fc1", "text_encoder.encoder.layers.1.self_attn.q_proj"]
TARGETS = UNET + TEXT
RANK, ALPHA = 4, 2.0


def kohya_name(module: str) -> str:
    component, path = module.split(".", 1)
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.replace(".", "_")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def loha_file(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int = 0,
    tucker: bool = False,
    targets: list[str] = TARGETS,
) -> dict[str, torch.Tensor]:
    """A LoHa (rank 4, alpha 2) in kohya naming; ``tucker``: 3x3 convs get Tucker cores."""
    gen = _gen(seed)
    out: dict[str, torch.Tensor] = {}
    for module in targets:
        base = shapes[module]
        name = kohya_name(module)
        if tucker and len(base) == 4 and base[2:] != (1, 1):
            for i in (1, 2):
                out[f"{name}.hada_t{i}"] = _randn(gen, RANK, RANK, *base[2:], std=0.4)
                out[f"{name}.hada_w{i}_a"] = _randn(gen, RANK, base[0], std=0.4)
                out[f"{name}.hada_w{i}_b"] = _randn(gen, RANK, base[1], std=0.4)
        else:
            flat = math.prod(base[1:])
            for i in (1, 2):
                out[f"{name}.hada_w{i}_a"] = _randn(gen, base[0], RANK, std=0.35)
                out[f"{name}.hada_w{i}_b"] = _randn(gen, RANK, flat, std=0.35)
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


def _split(n: int) -> tuple[int, int]:
    """LyCORIS's factorization(n): the most balanced (m, n/m) with m <= n/m."""
    best = (1, n)
    for m in range(1, math.isqrt(n) + 1):
        if n % m == 0:
            best = (m, n // m)
    return best


def lokr_file(
    shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0, targets: list[str] = TARGETS
) -> dict[str, torch.Tensor]:
    """A LoKr: full ``lokr_w1`` with a low-rank ``lokr_w2_a/b`` (linears), a full 4-D ``lokr_w2`` (1x1
    convs: no alpha applies) and a Tucker ``lokr_t2`` (3x3 convs); rank 4, alpha 2."""
    gen = _gen(seed)
    out: dict[str, torch.Tensor] = {}
    for module in targets:
        base = shapes[module]
        name = kohya_name(module)
        (a, b), (c, d) = _split(base[0]), _split(base[1])
        out[f"{name}.lokr_w1"] = _randn(gen, a, c, std=0.5)
        if len(base) == 2:
            out[f"{name}.lokr_w2_a"] = _randn(gen, b, RANK, std=0.15)
            out[f"{name}.lokr_w2_b"] = _randn(gen, RANK, d, std=0.15)
            out[f"{name}.alpha"] = torch.tensor(ALPHA)
        elif base[2:] == (1, 1):
            out[f"{name}.lokr_w2"] = _randn(gen, b, d, 1, 1, std=0.01)
            out[f"{name}.alpha"] = torch.tensor(ALPHA)  # ignored: two full factors apply at 1.0
        else:
            out[f"{name}.lokr_t2"] = _randn(gen, RANK, RANK, *base[2:], std=0.3)
            out[f"{name}.lokr_w2_a"] = _randn(gen, RANK, b, std=0.3)
            out[f"{name}.lokr_w2_b"] = _randn(gen, RANK, d, std=0.3)
            out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


def full_file(
    shapes: Mapping[str, tuple[int, ...]],
    biased: set[str],
    *,
    seed: int = 0,
    targets: list[str] = TARGETS,
) -> dict[str, torch.Tensor]:
    """A full-weight diff (``diff``, and ``diff_b`` for the modules in ``biased``)."""
    gen = _gen(seed)
    out: dict[str, torch.Tensor] = {}
    for module in targets:
        name = kohya_name(module)
        out[f"{name}.diff"] = _randn(gen, *shapes[module], std=0.02)
        if module in biased:
            out[f"{name}.diff_b"] = _randn(gen, shapes[module][0], std=0.02)
    return out


# -- independent ΔW (written from the LyCORIS formulas, not with adapters.delta) -------------------


def reference_deltas(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """module → (ΔW fp64, Δb or None) for a file made by the builders above."""
    by_name = {kohya_name(m): m for m in shapes}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, role = key.split(".", 1)
        grouped.setdefault(by_name[name], {})[role] = tensor.double()
    return {module: _reference(parts, shapes[module]) for module, parts in grouped.items()}


def _reference(p: dict[str, torch.Tensor], base: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "diff" in p:
        return p["diff"].reshape(base), p.get("diff_b")
    alpha = float(p["alpha"]) if "alpha" in p else None
    if "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            halves = []
            for i in (1, 2):
                t, wa, wb = p[f"hada_t{i}"], p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
                kernel = torch.zeros(base, dtype=torch.float64)
                for k in range(base[2]):
                    for l in range(base[3]):  # noqa: E741
                        kernel[:, :, k, l] = wa.T @ t[:, :, k, l] @ wb
                halves.append(kernel)
            delta = halves[0] * halves[1]
        else:
            delta = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(base)
        return delta * ((alpha if alpha is not None else rank) / rank), None
    w1 = p["lokr_w1"]
    if "lokr_w2" in p:
        w2, scale = p["lokr_w2"], 1.0
    elif "lokr_t2" in p:
        t, wa, wb = p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]
        w2 = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:], dtype=torch.float64)
        for k in range(t.shape[2]):
            for l in range(t.shape[3]):  # noqa: E741
                w2[:, :, k, l] = wa.T @ t[:, :, k, l] @ wb
        scale = (alpha or wb.shape[0]) / wb.shape[0]
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        scale = (alpha or p["lokr_w2_b"].shape[0]) / p["lokr_w2_b"].shape[0]
    rows, cols = w2.shape[0], w2.shape[1]
    delta = torch.zeros(w1.shape[0] * rows, w1.shape[1] * cols, *w2.shape[2:], dtype=torch.float64)
    for i in range(w1.shape[0]):  # the Kronecker product, block by block
        for j in range(w1.shape[1]):
            delta[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = w1[i, j] * w2
    return delta.reshape(base) * scale, None
