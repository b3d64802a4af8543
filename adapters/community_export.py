"""Canonical LoRAs → the kohya names of a transformer family's original model (Flux BFL, SD3 SGM).

The inverse of ``adapters.community``: every module the family's table splits (Flux's and SD3's qkv,
Flux's ``linear1``) or reorders (the final adaLN) is written under its fused original name, exactly:

* parts that share one down matrix (what a kohya file gives after reading) → that down and the parts'
  up rows in place: the same rank as the parts;
* parts with different downs (a LoRA trained on diffusers' to_q / to_k / to_v) → the downs stacked
  (rank Σ rᵢ) and a block-structured up (part i's rows use only its own rᵢ columns): rank k·n, exact;
* a part the adapter leaves out → zero rows (its ΔW is zero).

``alpha`` is written equal to the rank (the scale is folded in). Text encoders get the family's kohya
prefix (``lora_te1_`` …). A LoHa / LoKr / full diff on a fused or reordered module is refused
(``unsupported_conversion``): its factors do not stack into one of the same kind in general.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from adapters.errors import AdapterInvalid
from adapters.kinds import check_module, group, kind_of, uses_alpha
from basemodel.families.lora_tables import CommunityLayout, Target

Part = tuple[Target, torch.Tensor, torch.Tensor]  # target, lora_A, lora_B


def to_community_kohya(
    tensors: Mapping[str, torch.Tensor], layout: CommunityLayout, text_name: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    """Canonical LoRA tensors → ``lora_unet_<original path>`` keys (fused where the original fuses);
    ``text_name`` names a text-encoder module (``lora_te1_…``)."""
    owners = _owners(layout)
    lora, others = _split_kinds(tensors)
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, list[Part]] = {}
    prefix = f"{layout.component}."
    for module, (down, up) in sorted(lora.items()):
        path = module.removeprefix(prefix)
        if not module.startswith(prefix):
            _write(out, text_name(module), down, up)
        elif path in owners:
            source, target = owners[path]
            sources.setdefault(source, []).append((target, down, up))
        else:
            _write(out, layout.kohya_prefix + path.replace(".", "_"), down, up)
    for source, parts in sorted(sources.items()):
        name = layout.kohya_prefix + source.replace(".", "_")
        if len(layout.kohya[source]) == 1 and parts[0][0].rows is None:
            _write(out, name, parts[0][1], parts[0][2])
        else:
            down, up = _fuse(layout.kohya[source], parts)
            _write(out, name, down, up)
    for module, factors in sorted(others.items()):
        path = module.removeprefix(prefix)
        if module.startswith(prefix) and path in owners and owners[path][1].rows is not None:
            raise AdapterInvalid(
                f"{module} is part of the fused module {owners[path][0]} in kohya names; a LyCORIS adapter "
                "on it does not stack into one fused adapter of the same kind",
                reason="unsupported_conversion",
                hint="Keep the file in its canonical (diffusers-name) layout, or merge it with "
                "'loraswap adapters merge'.",
            )
        name = text_name(module) if not module.startswith(prefix) else _plain_name(layout, owners, path)
        for role, tensor in factors.items():
            out[f"{name}.{role}"] = tensor
        alpha = _lycoris_alpha(factors)
        if alpha is not None:
            out[f"{name}.alpha"] = alpha
    return out


def _owners(layout: CommunityLayout) -> dict[str, tuple[str, Target]]:
    """diffusers module path → (original source path, its target entry)."""
    return {target.module: (source, target) for source, targets in layout.kohya.items() for target in targets}


def _split_kinds(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    modules, stray = group(tensors)
    if stray:
        raise AdapterInvalid(f"not a canonical key: {sorted(stray)[0]}", reason="not_canonical")
    lora = {m: (f["lora_A.weight"], f["lora_B.weight"]) for m, f in modules.items() if "lora_A.weight" in f}
    others = {m: f for m, f in modules.items() if "lora_A.weight" not in f}
    return lora, others


def _plain_name(layout: CommunityLayout, owners: Mapping[str, tuple[str, Target]], path: str) -> str:
    source = owners[path][0] if path in owners else path
    return layout.kohya_prefix + source.replace(".", "_")


def _lycoris_alpha(factors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """alpha = rank where the kind applies one (the scale is folded in), as ``lycoris_to_kohya`` writes."""
    kind = kind_of(set(factors)).pop()
    rank, _ = check_module(kind, factors, None)
    if rank is None or not uses_alpha(kind, factors):
        return None
    return torch.tensor(float(rank), dtype=torch.float32)


def _write(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"{name}.lora_down.weight"] = down
    out[f"{name}.lora_up.weight"] = up
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)


def _fuse(targets: tuple[Target, ...], parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) whose ΔW is every part's ΔW at its source rows (zero rows for absent parts)."""
    rows = max(end for t in targets for _, end in (t.rows or ()))
    first_down = parts[0][1]
    shared = all(p[1].shape == first_down.shape and torch.equal(p[1], first_down) for p in parts)
    downs = [first_down] if shared else [p[1] for p in parts]
    down = torch.cat(downs)
    up = torch.zeros(rows, down.shape[0], dtype=parts[0][2].dtype)
    column = 0
    for target, part_down, part_up in parts:
        rank = part_down.shape[0]
        columns = slice(0, rank) if shared else slice(column, column + rank)
        offset = 0
        for start, end in target.rows or ():
            up[start:end, columns] = part_up[offset : offset + end - start]
            offset += end - start
        column += 0 if shared else rank
    return down, up
