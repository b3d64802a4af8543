"""A fuzz case under construction, and the mutation type the strategies produce.

A case starts as a valid ``Seed`` and passes through four stages; each mutation acts on one:

* ``tensors``: the tensor dict and the ``__metadata__`` strings (key names, values, dtypes, metadata);
* ``header``: the header object built from them (offsets, dtypes, shapes, entry types, metadata types);
* ``text``: the header's JSON bytes (truncation, duplicate keys, encoding, nesting);
* ``file``: the whole file (length field, truncation, extension, magic bytes, flipped bytes).

``args`` mutations change what is passed to ``Registry.register`` besides the bytes (the user metadata,
``scale_default``, the id). A mutation may declare that the result must be refused (``Draft.refuse``)
and, for ``scale_default``, which value a successful registration must store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adapters.metadata import METADATA_KEY
from loadtests.fuzz.seeds import Seed, assemble, encode, header_text

Stage = Literal["args", "tensors", "header", "text", "file"]
STAGES: tuple[Stage, ...] = ("args", "tensors", "header", "text", "file")
UNSET: Any = object()  # a scale_default source that was not given
BENIGN_FAMILY = "benign"
SCALE_FAMILY = "scale"

# lora_A/down suffix -> lora_B/up suffix, for every accepted layout
PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


@dataclass
class Draft:
    tensors: dict[str, torch.Tensor]
    metadata: Any  # ``__metadata__``: a str -> str dict in valid files, anything after a mutation
    header: dict[str, Any] = field(default_factory=dict)
    data: bytes = b""
    text: bytes = b""
    blob: bytes = b""
    adapter_id: str = "fuzz"
    metadata_arg: Any = None
    scale_arg: Any = UNSET
    ascii_header: bool = True
    refuse: list[tuple[str, Callable[[], bool] | None]] = field(default_factory=list)

    def must_refuse(self, why: str, still: Callable[[], bool] | None = None) -> None:
        """The case must be refused, as long as ``still()`` holds once every mutation has run.

        ``still`` lets a later mutation undo an earlier one (a NaN overwritten, an entry replaced)
        without the oracle demanding a refusal for a file that became valid again.
        """
        self.refuse.append((why, still))

    def pairs(self) -> list[tuple[str, str, str]]:
        """(lora_A key, lora_B key, module prefix) for every complete pair in the tensors."""
        found = []
        for key in self.tensors:
            for down, up in PAIR_SUFFIXES:
                if key.endswith(down) and key.removesuffix(down) + up in self.tensors:
                    prefix = key.removesuffix(down)
                    found.append((key, prefix + up, prefix))
        return found

    def entries(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]


@dataclass(frozen=True)
class Mutation:
    family: str
    label: str
    stage: Stage
    apply: Callable[[Draft], None] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Case:
    """What one registration is given, and what the oracle must check about its outcome."""

    seed: str
    labels: tuple[str, ...]
    data: bytes
    adapter_id: str
    metadata: Any
    scale_default: float | None
    refuse: tuple[str, ...]
    expect_scale: Any  # UNSET: no expectation; else the scale_default a registered version must store
    must_register: bool = False  # only benign mutations: the file is valid


def in_range(value: Any, bounds: tuple[float, float]) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and bounds[0] <= value <= bounds[1]


def build(seed: Seed, mutations: Sequence[Mutation], scale_bounds: tuple[float, float]) -> Case:
    """Apply ``mutations`` stage by stage to a copy of ``seed``."""
    draft = Draft(dict(seed.tensors), dict(seed.metadata))
    for stage in STAGES:
        if stage == "header":
            draft.header, draft.data = encode(draft.tensors, draft.metadata)
        elif stage == "text":
            draft.text = header_text(draft.header, ascii=draft.ascii_header)
        elif stage == "file":
            draft.blob = assemble(draft.text, draft.data)
        for mutation in mutations:
            if mutation.stage == stage:
                mutation.apply(draft)
    expect_scale = effective_scale(draft) if any(m.family == SCALE_FAMILY for m in mutations) else UNSET
    return Case(
        seed=seed.name,
        labels=tuple(f"{m.family}:{m.label}" for m in mutations),
        data=draft.blob,
        adapter_id=draft.adapter_id,
        metadata=draft.metadata_arg,
        scale_default=None if draft.scale_arg is UNSET else draft.scale_arg,
        refuse=tuple(why for why, still in draft.refuse if still is None or still())
        + _scale_refusal(expect_scale, scale_bounds),
        expect_scale=expect_scale,
        must_register=all(m.family == BENIGN_FAMILY for m in mutations),
    )


def effective_scale(draft: Draft) -> Any:
    """The scale_default a registration must store, from the final case: the argument, else the user's
    metadata, else the file's ``loraswap`` entry (later mutations may have replaced what a scale
    mutation set, so this reads what is actually sent)."""
    header_metadata = draft.header.get("__metadata__")
    embedded = header_metadata.get(METADATA_KEY) if isinstance(header_metadata, dict) else None
    argument = UNSET if draft.scale_arg is None else draft.scale_arg  # None: not given
    for value in (argument, _scale_in(draft.metadata_arg), _scale_in(embedded)):
        if value is not UNSET:
            return value
    return UNSET


def _scale_in(metadata: Any) -> Any:
    """``scale_default`` of metadata given as an object or JSON text (UNSET when it names none)."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except (ValueError, RecursionError):
            return UNSET
    return metadata.get("scale_default", UNSET) if isinstance(metadata, dict) else UNSET


def _scale_refusal(value: Any, bounds: tuple[float, float]) -> tuple[str, ...]:
    if value is UNSET or value is None or in_range(value, bounds):
        return ()
    return (f"scale_default {value!r} outside {list(bounds)}",)
