"""Community LoRA key tables: how a file's module names map onto a family's diffusers modules.

Pure data, built by each family from its denoiser's config (``basemodel/families/flux/lora_keys.py``,
``…/sd3/lora_keys.py``) and applied by ``adapters.community``. A source module (what a tool names, e.g.
Flux's fused ``double_blocks.0.img_attn.qkv``) maps onto one or more ``Target`` modules; each target's
ΔW is the concatenation of some row ranges of the source's ΔW:

* a plain rename: one target, every row (``rows`` None);
* a fused projection split (qkv, Flux's ``linear1`` = q, k, v and the MLP input): one target per part,
  each one contiguous range at the model's own widths;
* a reordering (the final adaLN's ``shift, scale`` → diffusers' ``scale, shift``): one target whose
  ranges are the halves swapped.

Row ranges of ΔW = B·A are row ranges of B with the same A, so a LoRA splits exactly (the parts share
the down matrix); LoHa and full diffs split on their row factors; a LoKr only where a range falls on
its Kronecker block boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Rows = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Target:
    """A diffusers module (path inside its component) and the source rows that make its ΔW."""

    module: str
    rows: Rows | None = None  # None: every row, in order

    def out_rows(self) -> int | None:
        return None if self.rows is None else sum(end - start for start, end in self.rows)


Table = Mapping[str, tuple[Target, ...]]
"""dotted source module path → the targets its ΔW is split into."""


@dataclass(frozen=True)
class CommunityLayout:
    """Everything ``adapters.community`` needs to read (and write) a family's community files.

    ``component``: the denoiser component the tables name (``transformer``); ``kohya``: source path in
    the original (BFL / SGM) model → targets, the names kohya sd-scripts, ComfyUI and ai-toolkit write
    (kohya with ``_`` for ``.`` after ``lora_unet_``); ``xlabs``: XLabs processor names → targets;
    ``text_prefixes``: key prefix → text-encoder component (``lora_te1_``, ComfyUI's
    ``text_encoders.clip_l.transformer.``); ``refused``: key prefix → why keys under it are refused
    (the T5 encoder is never adapted).
    """

    component: str
    kohya: Table
    xlabs: Table = field(default_factory=dict)
    text_prefixes: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    kohya_prefix: str = "lora_unet_"


def rename(module: str) -> tuple[Target, ...]:
    return (Target(module),)


def split(modules: Sequence[str], widths: Sequence[int]) -> tuple[Target, ...]:
    """A fused projection: ``modules[i]`` takes the next ``widths[i]`` rows."""
    targets: list[Target] = []
    start = 0
    for module, width in zip(modules, widths, strict=True):
        targets.append(Target(module, ((start, start + width),)))
        start += width
    return tuple(targets)


def swap_halves(module: str, half: int) -> tuple[Target, ...]:
    """``shift, scale`` (BFL / SGM adaLN order) → ``scale, shift`` (diffusers' AdaLayerNormContinuous)."""
    return (Target(module, ((half, 2 * half), (0, half))),)
