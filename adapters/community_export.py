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
(``unsupported_conversion``): its factors do not stack into one of the same kind in general. A DoRA
on one is written fused when that is exact (``_fused_dora``): the parts of one fused weight's
per-column DoRA (``dora_group``) stack back into it, and per-row magnitudes stack row by row; parts
normalised separately per column, or a fused module with parts left out, are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from adapters.errors import AdapterInvalid
from adapters.kinds import check_module, group, kind_of, uses_alpha
from adapters.lycoris import lycoris_to_kohya
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
    dora = {m: f for m, f in others.items() if kind_of(set(f)) == {"dora"}}
    out |= _dora_to_kohya(dora, layout, owners, text_name)
    for module, factors in sorted(others.items()):
        if module in dora:
            continue
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


def _dora_to_kohya(
    dora: Mapping[str, Mapping[str, torch.Tensor]],
    layout: CommunityLayout,
    owners: Mapping[str, tuple[str, Target]],
    text_name: Callable[[str], str],
) -> dict[str, torch.Tensor]:
    """DoRA modules → kohya/LyCORIS keys (``lora_down``/``lora_up``/``dora_scale``, alpha = rank; a PEFT
    magnitude as a ``[out, 1]`` ``dora_scale``, as ``lycoris_to_kohya`` writes it). The parts of a fused
    or reordered original module go under its name together (``_fused_dora``)."""
    prefix = f"{layout.component}."
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, dict[str, Mapping[str, torch.Tensor]]] = {}
    for module, factors in sorted(dora.items()):
        path = module.removeprefix(prefix)
        if module.startswith(prefix) and path in owners and owners[path][1].rows is not None:
            sources.setdefault(owners[path][0], {})[path] = factors
            continue
        name = text_name(module) if not module.startswith(prefix) else _plain_name(layout, owners, path)
        out |= lycoris_to_kohya({f"{module}.{role}": t for role, t in factors.items()}, _named(name))
    for source, parts in sorted(sources.items()):
        name = layout.kohya_prefix + source.replace(".", "_")
        out |= lycoris_to_kohya(
            _fused_dora(layout.kohya[source], parts, source, layout.component), _named(name)
        )
    return out


def _named(name: str) -> Callable[[str], str]:
    return lambda _module: name


def _fused_dora(
    targets: tuple[Target, ...],
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    source: str,
    component: str,
) -> dict[str, torch.Tensor]:
    """One canonical DoRA module (``<component>.<source>``) whose weight is every part's at its source rows,
    exactly: every part present, and either one fused weight's per-column magnitude (the parts of one
    ``dora_group``, or a single reordered part) or per-row magnitudes on every part (rows in place)."""
    missing = [t.module for t in targets if t.module not in parts]
    per_row = [_row_magnitude(parts[t.module]) for t in targets if t.module in parts]
    groups = {float(f["dora_group"]) if "dora_group" in f else None for f in parts.values()}
    one_weight = len(targets) == 1 or (len(groups) == 1 and None not in groups)
    rowwise = [m for m in per_row if m is not None]
    if missing or not (len(rowwise) == len(per_row) or (one_weight and not rowwise)):
        why = f"it leaves out {', '.join(missing)}" if missing else "its parts were normalised separately"
        raise AdapterInvalid(
            f"the DoRA on the parts of the fused module {source} cannot be written as one DoRA on it: {why}",
            reason="unsupported_conversion",
            hint="Keep the file in its canonical (diffusers-name) layout, or merge it with "
            "'loraswap adapters merge'.",
        )
    ordered = [(t, parts[t.module]) for t in targets]
    down, up = _fuse(targets, [(t, f["dora_down"], f["dora_up"]) for t, f in ordered])
    module = f"{component}.{source}"
    if not rowwise:
        scale = ordered[0][1]["dora_scale"]
        return {f"{module}.dora_down": down, f"{module}.dora_up": up, f"{module}.dora_scale": scale}
    magnitude = torch.zeros(up.shape[0], dtype=up.dtype)
    for (target, _), rows in zip(ordered, rowwise, strict=True):
        offset = 0
        for start, end in target.rows or ():
            magnitude[start:end] = rows[offset : offset + end - start]
            offset += end - start
    shaped = magnitude.reshape(-1, *([1] * (down.dim() - 1)))
    return {f"{module}.dora_down": down, f"{module}.dora_up": up, f"{module}.dora_scale": shaped}


def _row_magnitude(factors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """A part's per-output-row magnitude (PEFT's, or a per-row ``dora_scale``) flattened; None for a
    per-input-column one."""
    if "dora_magnitude" in factors:
        return factors["dora_magnitude"].reshape(-1)
    scale, up = factors["dora_scale"], factors["dora_up"]
    return scale.reshape(-1) if scale.shape[0] == up.shape[0] and scale.shape[0] != 1 else None


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
