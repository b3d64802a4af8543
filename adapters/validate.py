"""Tensor-level checks shared by normalisation, writing and opening: dtype, finiteness, shapes, rank.

Shape rules (``base`` is the base module's weight shape from ``Architecture.modules``):

* ``nn.Linear`` ``[out, in]``: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``;
* ``nn.Conv2d`` ``[out, in, kh, kw]`` (LoCon): ``lora_A`` ``[r, in, kh, kw]``, ``lora_B`` ``[out, r, 1, 1]``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from adapters import kinds
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.kinds import LYCORIS_ROLES
from basemodel.fingerprint import Architecture

DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
COMPONENTS = kinds.COMPONENTS  # text_encoder_2: SDXL's and SD3's second CLIP
CANONICAL_KEY = re.compile(rf"^(?P<module>(?:{'|'.join(COMPONENTS)})\..+)\.lora_(?P<role>[AB])\.weight$")
SHOW = 5  # how many offending keys an error message lists
MAX_ALPHA_RATIO = 64
"""alpha may be at most this multiple of its module's rank (alpha/rank is folded into lora_B)."""


def first(items: Iterable[str], n: int = SHOW) -> list[str]:
    return sorted(items)[:n]


def check_dtypes(tensors: Mapping[str, torch.Tensor]) -> None:
    bad = {k: str(v.dtype) for k, v in tensors.items() if v.dtype not in DTYPE_NAMES}
    if bad:
        keys = first(bad)
        raise AdapterInvalid(
            f"unsupported tensor dtype {bad[keys[0]]} (in {keys[0]}); fp32, fp16 and bf16 are accepted",
            reason="unsupported_dtype",
            detail={"keys": keys, "dtypes": sorted(set(bad.values()))},
        )


def _finite(tensor: torch.Tensor) -> bool:
    # One fp32 reduction per tensor: NaN and ±inf always make the sum non-finite, and finite fp16/bf16/fp32
    # values of a LoRA cannot overflow an fp32 sum in practice. Only a non-finite sum (a real NaN/inf, or
    # an overflow) pays for the exact elementwise check. ~8x cheaper than isfinite().all() on SD1.5 LoRAs.
    if math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    bad = [k for k, v in tensors.items() if not _finite(v)]
    if bad:
        raise AdapterInvalid(
            f"{len(bad)} tensor(s) contain NaN or infinite values, e.g. {first(bad, 1)[0]}",
            reason="non_finite",
            detail={"keys": first(bad)},
        )


def expected_shapes(base: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_A shape, lora_B shape) for a base weight shape and a rank."""
    if len(base) == 2:
        out_f, in_f = base
        return (rank, in_f), (out_f, rank)
    out_c, in_c, kh, kw = base
    return (rank, in_c, kh, kw), (out_c, rank, 1, 1)


def check_pair_shapes(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], architecture: Architecture | None
) -> dict[str, int]:
    """Check every (lora_A, lora_B) pair; returns module → rank. Mismatches are listed together."""
    ranks: dict[str, int] = {}
    problems: dict[str, str] = {}
    for module, (down, up) in pairs.items():
        rank = int(down.shape[0]) if down.dim() >= 1 else 0
        if down.dim() not in (2, 4) or up.dim() != down.dim() or rank < 1:
            problems[module] = f"lora_A {list(down.shape)} / lora_B {list(up.shape)} is not a LoRA pair"
            continue
        base = architecture.shape_of(module) if architecture is not None else _implied_base(down, up)
        if base is None or len(base) not in (2, 4):
            problems[module] = "module has no linear/conv weight in the base model"
            continue
        want_a, want_b = expected_shapes(base, rank)
        if tuple(down.shape) != want_a or tuple(up.shape) != want_b:
            problems[module] = (
                f"lora_A {list(down.shape)} / lora_B {list(up.shape)}, "
                f"expected {list(want_a)} / {list(want_b)} for base weight {list(base)}"
            )
            continue
        ranks[module] = rank
    if problems:
        shown = first(problems)
        raise AdapterIncompatible(
            f"{len(problems)} LoRA pair(s) do not match the base model's module shapes, "
            f"e.g. {shown[0]}: {problems[shown[0]]}",
            reason="shape_mismatch",
            detail={"modules": {m: problems[m] for m in shown}, "count": len(problems)},
        )
    return ranks


def _implied_base(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    """Without an architecture, the base shape the pair itself implies (checks internal consistency)."""
    if down.dim() == 2:
        return (int(up.shape[0]), int(down.shape[1]))
    return (int(up.shape[0]), int(down.shape[1]), int(down.shape[2]), int(down.shape[3]))


def check_modules_exist(modules: Iterable[str], architecture: Architecture) -> None:
    absent = [m for m in modules if architecture.shape_of(m) is None]
    if absent:
        shown = first(absent)
        raise AdapterIncompatible(
            f"{len(absent)} LoRA module(s) are absent from the base model, e.g. {', '.join(shown)}",
            reason="modules_absent",
            detail={"modules": shown, "count": len(absent), "architecture_id": architecture.architecture_id},
        )


def check_rank(ranks: Mapping[str, int], max_rank: int | None) -> None:
    if max_rank is None:
        return
    over = {m: r for m, r in ranks.items() if r > max_rank}
    if over:
        worst = max(over, key=lambda m: over[m])
        raise AdapterInvalid(
            f"LoRA rank {over[worst]} (module {worst}) exceeds the configured maximum {max_rank}",
            reason="rank_too_large",
            detail={"max_rank": max_rank, "modules": {m: over[m] for m in first(over)}},
            hint="Use a lower-rank adapter or raise LORASWAP_MAX_LORA_RANK.",
        )


def check_alpha(module: str, alpha: float, rank: int, key: str | None = None) -> float:
    """``alpha`` if it is finite and ``0 < alpha <= MAX_ALPHA_RATIO * rank``; else ``AdapterInvalid``."""
    if not (math.isfinite(alpha) and 0 < alpha <= MAX_ALPHA_RATIO * rank):
        where = f"{key} (module {module})" if key else f"module {module}"
        raise AdapterInvalid(
            f"alpha {alpha!r} of {where} is out of range: 0 < alpha <= {MAX_ALPHA_RATIO} x rank ({rank})",
            reason="bad_alpha",
            detail={"keys": [key] if key else [], "modules": [module], "rank": rank},
        )
    return alpha


def dominant(values: Mapping[str, int | float]) -> tuple[int | float, dict[str, int | float]]:
    """Most common value and the {key: value} exceptions to it (PEFT's rank_pattern idea)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {k: v for k, v in sorted(values.items()) if v != common}


@dataclass(frozen=True)
class CanonicalSummary:
    """What a canonical-layout tensor dict contains."""

    ranks: dict[str, int]
    dtype: str
    kind: str = "lora"  # adapters.kinds.AdapterKind

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.ranks)


def canonical_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group canonical keys into module → (lora_A, lora_B); anything else is an error."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, tensor in tensors.items():
        match = CANONICAL_KEY.match(key)
        if match is None:
            stray.append(key)
            continue
        halves.setdefault(match["module"], {})[match["role"]] = tensor
    if stray:
        raise AdapterInvalid(
            f"{len(stray)} key(s) are not in the canonical layout, e.g. {first(stray, 1)[0]}",
            reason="not_canonical",
            detail={"keys": first(stray)},
            hint=f"Canonical keys are <{'|'.join(COMPONENTS)}>.<module>.lora_A.weight / .lora_B.weight.",
        )
    incomplete = [m for m, h in halves.items() if set(h) != {"A", "B"}]
    if incomplete:
        raise AdapterInvalid(
            f"{len(incomplete)} module(s) lack lora_A or lora_B, e.g. {first(incomplete, 1)[0]}",
            reason="incomplete_pair",
            detail={"modules": first(incomplete)},
        )
    return {m: (h["A"], h["B"]) for m, h in sorted(halves.items())}


def check_canonical(
    tensors: Mapping[str, torch.Tensor],
    architecture: Architecture | None = None,
    *,
    max_rank: int | None = None,
    finite: bool = True,
) -> CanonicalSummary:
    """Validate canonical-layout tensors (structure, dtype, finiteness, shapes, rank).

    ``finite=False`` leaves the values to the caller (``Registry.open_data`` checks them in one pass
    over the file's data region): every other check reads shapes and dtypes only.
    """
    if not tensors:
        raise AdapterInvalid("the adapter contains no tensors", reason="empty")
    check_dtypes(tensors)
    from adapters import embedding  # imports this module's checks

    if embedding.is_canonical(tensors):
        counts = embedding.check_canonical_embedding(tensors, architecture)
        return CanonicalSummary(ranks=counts, dtype=embedding.summary(tensors)[1], kind="embedding")
    if any(key.rsplit(".", 1)[-1] in LYCORIS_ROLES for key in tensors):
        ranks, kind = _lycoris_canonical(tensors, architecture, max_rank)
    else:
        pairs = canonical_pairs(tensors)
        if architecture is not None:
            check_modules_exist(pairs, architecture)
        ranks, kind = check_pair_shapes(pairs, architecture), "lora"
        check_rank(ranks, max_rank)
    if finite:
        check_finite(tensors)
    dtypes = {DTYPE_NAMES[t.dtype] for t in tensors.values()}
    if len(dtypes) != 1:
        raise AdapterInvalid(
            f"canonical adapters use one dtype, found {sorted(dtypes)}",
            reason="mixed_dtype",
        )
    return CanonicalSummary(ranks=ranks, dtype=dtypes.pop(), kind=kind)


def check_lora_shapes(tensors: Mapping[str, torch.Tensor], architecture: Architecture | None) -> bool:
    """``check_canonical(finite=False)`` for a plain LoRA (``lora_A``/``lora_B`` pairs), whose checks read
    names, shapes and dtypes and no value, so it may run on views of a file whose bytes are still
    arriving (``adapters.opening``; tested on meta tensors). False, having checked nothing, for the
    other kinds: embeddings, LyCORIS and DoRA checks read a few values (alphas, DoRA groups)."""
    from adapters import embedding  # imports this module's checks

    if not tensors or embedding.is_canonical(tensors):
        return False
    if any(key.rsplit(".", 1)[-1] in LYCORIS_ROLES for key in tensors):
        return False
    check_canonical(tensors, architecture, finite=False)
    return True


def check_kind_modules(
    kind: str,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    shapes: Mapping[str, tuple[int, ...] | None],
    max_rank: int | None,
    *,
    label: str = "",
    keys: Mapping[str, Iterable[str]] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Each module's factors against its kind's structure and the base module's shape (``None``: no
    base to check against). Returns the rank reported per module and the low rank of the modules that
    have one (LoRA, LoHa, factored LoKr). ``label`` names the kind in messages, ``keys`` the file's
    keys of each module (shown when one is incomplete)."""
    noun = f"{label} module" if label else "module"
    ranks: dict[str, int] = {}
    low: dict[str, int] = {}
    problems: dict[str, str] = {}
    for module, factors in modules.items():
        try:
            rank, shape = kinds.check_module(kind, factors, shapes[module])
        except kinds.StructureProblem as exc:
            detail: dict[str, object] = {"modules": [module]}
            if keys is not None:
                detail["keys"] = sorted(keys[module])
            raise AdapterInvalid(
                f"{noun} {module} is incomplete: {exc}", reason="incomplete_pair", detail=detail
            ) from None
        except kinds.ShapeProblem as exc:
            problems[module] = str(exc)
            continue
        ranks[module] = kinds.reported_rank(rank, shape)
        if rank is not None:
            low[module] = rank
    if problems:
        shown = first(problems)
        raise AdapterIncompatible(
            f"{len(problems)} {noun}(s) do not match the base model's module shapes, "
            f"e.g. {shown[0]}: {problems[shown[0]]}",
            reason="shape_mismatch",
            detail={"modules": {m: problems[m] for m in shown}, "count": len(problems)},
        )
    if kind == "dora":
        _check_dora_groups(modules)
    check_rank(low, max_rank)
    return ranks, low


def _check_dora_groups(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    try:
        kinds.dora_groups(modules)
    except kinds.StructureProblem as exc:
        raise AdapterInvalid(
            f"DoRA parts of a fused module do not fit together: {exc}", reason="bad_dora_group"
        ) from None


def _lycoris_canonical(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture | None, max_rank: int | None
) -> tuple[dict[str, int], str]:
    """Canonical LoHa / LoKr / full tensors: one kind, complete modules, shapes (vs the base), rank."""
    modules, stray = kinds.group(tensors)
    if stray:
        raise AdapterInvalid(
            f"{len(stray)} key(s) are not in the canonical layout, e.g. {first(stray, 1)[0]}",
            reason="not_canonical",
            detail={"keys": first(stray)},
        )
    found = {kind for factors in modules.values() for kind in kinds.kind_of(set(factors))}
    if len(found) != 1:
        raise AdapterInvalid(
            f"canonical adapters hold one kind, found {sorted(found)}", reason="mixed_adapter_kinds"
        )
    kind = found.pop()
    if architecture is not None:
        check_modules_exist(modules, architecture)
    shapes = {m: architecture.shape_of(m) if architecture is not None else None for m in modules}
    ranks, _ = check_kind_modules(kind, modules, shapes, max_rank)
    return ranks, kind
