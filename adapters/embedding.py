"""Textual-inversion embeddings (kind ``embedding``): files → canonical vectors, checked against the base.

Accepted files (``.safetensors`` only; ``.pt`` / ``.bin`` are pickles and refused unopened, like every
pickle, by ``adapters.format``):

* A1111 SD1.x / SD2.x: one key ``emb_params`` ``[n, width]``;
* A1111 SDXL: ``clip_l`` ``[n, 768]`` (``text_encoder``, CLIP ViT-L) and ``clip_g`` ``[n, 1280]``
  (``text_encoder_2``, OpenCLIP ViT-bigG), the same ``n``; ComfyUI's ``t5xxl`` (or ``t5``) beside them
  is dropped (no T5 takes embeddings here) and a file with T5 vectors only is refused (``t5_only``);
* diffusers' ``learned_embeds.safetensors``: one key, the placeholder token (``"<cat-toy>"``, or a word
  without dots), holding
  ``[n, width]`` or a single vector ``[width]`` (older ``textual_inversion.py`` runs);
* the canonical form below (what the registry stores and ``adapters convert --to diffusers`` writes).

Which text encoder takes which part is the base family's ``embedding_parts``: SD1.x/SD2.x
``text_encoder`` takes a one-encoder file (or ``clip_l``); SDXL and SD3/SD3.5 take ``clip_l`` on
``text_encoder`` and ``clip_g`` on ``text_encoder_2``; Flux.1's CLIP-L (``text_encoder``) takes a
one-encoder file or ``clip_l`` and drops ``clip_g`` (``embedding_dropped``).

Canonical form: ``<component>.embedding`` ``[n, width]`` per text encoder that takes it (``text_encoder``,
and ``text_encoder_2`` on SDXL and SD3). The metadata's ``rank`` is ``n`` (the number of vectors), its
``target_modules`` are those keys. ``adapters convert --to kohya`` writes A1111's layout back.

Checks against the base model (typed 4xx, nothing stored): every text encoder the base has must get
vectors and no other (a one-encoder embedding on SDXL, ``clip_g`` on SD1.x: ``family_mismatch``), each
as wide as that encoder's token embedding (``shape_mismatch``; 768 is SD1.x, 1024 SD2.x), from 1 to
``MAX_VECTORS`` vectors, finite, fp32/fp16/bf16.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.metadata import SourceFormat
from adapters.normalise import NormaliseInfo
from adapters.validate import DTYPE_NAMES, check_dtypes, check_finite
from basemodel.families import find_family, label_of, owners_of
from basemodel.fingerprint import Architecture

ENCODERS = ("text_encoder", "text_encoder_2")
SUFFIX = ".embedding"
CANONICAL = tuple(f"{encoder}{SUFFIX}" for encoder in ENCODERS)
A1111_SINGLE = "emb_params"
A1111_SDXL = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# ComfyUI's key for T5-XXL vectors (SD3, Flux), and the bare name: no family's T5 takes embeddings
T5_KEYS = ("t5xxl", "t5")
NAMED = {*A1111_SDXL, *T5_KEYS}  # the keys of A1111/ComfyUI's per-encoder layout
# without a base model: the parts SD1.x/SD2.x/SDXL take (``ModelFamily.embedding_parts``)
DEFAULT_PARTS = {"single": "text_encoder", **A1111_SDXL}
MAX_VECTORS = 75
"""A CLIP prompt holds 75 tokens between its start and end tokens: a longer embedding cannot fit."""
# a diffusers placeholder token: "<cat-toy>", or a word without dots (a dotted key is a module's tensor)
TOKEN = re.compile(r"<[^<>\s]{1,64}>|[^.\s<>]{1,64}")
WIDTH_FAMILIES = {768: "SD1.x (CLIP ViT-L)", 1024: "SD2.x (OpenCLIP ViT-H)", 1280: "SDXL's text_encoder_2"}


def is_embedding(tensors: Mapping[str, object]) -> bool:
    """Whether the file's keys are a textual-inversion embedding's (any accepted layout)."""
    keys = set(tensors)
    if keys == {A1111_SINGLE} or (keys and keys <= NAMED) or (keys and keys <= set(CANONICAL)):
        return True
    if len(keys) != 1:
        return False
    (key,) = keys
    tensor = tensors[key]
    return isinstance(tensor, torch.Tensor) and tensor.dim() in (1, 2) and TOKEN.fullmatch(key) is not None


def is_canonical(tensors: Mapping[str, object]) -> bool:
    return bool(tensors) and set(tensors) <= set(CANONICAL)


def source_of(tensors: Mapping[str, object]) -> tuple[SourceFormat, dict[str, str]]:
    """The file's layout and which key holds each part: ``single`` (a one-encoder file), ``clip_l``,
    ``clip_g``, ``t5``, or a text encoder component (the canonical form)."""
    keys = set(tensors)
    if keys == {A1111_SINGLE}:
        return "a1111", {"single": A1111_SINGLE}
    if keys <= NAMED:
        return "a1111", {("t5" if key in T5_KEYS else key): key for key in sorted(keys)}
    if keys <= set(CANONICAL):
        return "loraswap", {key.removesuffix(SUFFIX): key for key in sorted(keys)}
    return "diffusers", {"single": next(iter(keys))}


def parts_of(architecture: Architecture | None) -> tuple[dict[str, str], frozenset[str]]:
    """The base family's ``embedding_parts`` (part → text encoder; a canonical file's components map to
    themselves) and the parts it drops; SD1.x/SD2.x/SDXL's without a base."""
    family = find_family(architecture.family) if architecture is not None else None
    parts = dict(family.embedding_parts) if family is not None else dict(DEFAULT_PARTS)
    dropped = family.embedding_dropped if family is not None else frozenset()
    return parts | {encoder: encoder for encoder in set(parts.values())}, dropped | {"t5"}


def text_widths(architecture: Architecture) -> dict[str, int]:
    """Each text encoder of the base that takes embeddings → its width (the token embedding's, = a
    q_proj's input width)."""
    taking = set(parts_of(architecture)[0].values())
    widths: dict[str, int] = {}
    for module, shape in sorted(architecture.modules.items()):
        component = module.split(".", 1)[0]
        if component in taking and module.endswith("q_proj") and component not in widths:
            widths[component] = int(shape[1])
    return widths


def encoders_of(
    keys: Mapping[str, str], architecture: Architecture | None, found: list[str]
) -> dict[str, str]:
    """Text encoder → the file key holding its vectors: each part the base family takes, without the
    parts it drops (T5 always); a part for an encoder it lacks stays under its default encoder, for
    ``check_against`` to name. A file with T5 vectors only is refused."""
    parts, dropped = parts_of(architecture)
    if set(keys) <= {"t5"}:
        raise AdapterInvalid(
            f"the embedding has T5 vectors only ({', '.join(found)}); textual inversion applies to the "
            "CLIP text encoders (CLIP-L, CLIP-G): no base model's T5 takes embeddings here",
            reason="t5_only",
            detail={"keys": found},
            hint="Use an embedding with CLIP vectors (emb_params, or clip_l / clip_g).",
        )
    encoders: dict[str, str] = {}
    for part, key in keys.items():
        if part in dropped:
            continue
        encoders[parts.get(part) or DEFAULT_PARTS.get(part) or part] = key
    if not encoders:
        raise AdapterIncompatible(
            f"the embedding has {', '.join(found)} vectors only, none of which this base model's text "
            "encoders take",
            reason="family_mismatch",
            detail={"keys": found, "base_family": architecture.family if architecture else None},
            hint="Use an embedding made for this base model's family.",
        )
    return encoders


def normalise_embedding(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture | None
) -> tuple[dict[str, torch.Tensor], SourceFormat]:
    """Any accepted layout → canonical vectors (copies, the file's dtype), checked against ``architecture``
    (None: the tensors' own consistency only)."""
    check_dtypes(tensors)
    check_finite(tensors)
    layout, parts = source_of(tensors)
    if layout == "a1111" and "clip_g" in parts and "clip_l" not in parts:
        raise AdapterInvalid(
            "the SDXL embedding has clip_g but no clip_l vectors; A1111 SDXL embeddings carry both",
            reason="incomplete_pair",
            detail={"keys": sorted(tensors)},
        )
    keys = encoders_of(parts, architecture, sorted(tensors))
    vectors = {encoder: _matrix(tensors[key], key) for encoder, key in keys.items()}
    counts = {encoder: int(v.shape[0]) for encoder, v in vectors.items()}
    if len(set(counts.values())) != 1:
        raise AdapterInvalid(
            f"the text encoders get different numbers of vectors: {counts}; an embedding has one count",
            reason="shape_mismatch",
            detail={"vectors": counts},
        )
    if architecture is not None:
        check_against(vectors, architecture)
    dtypes = {t.dtype for t in vectors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    canonical = {
        f"{encoder}{SUFFIX}": v.detach().to(dtype, copy=True).contiguous() for encoder, v in vectors.items()
    }
    return canonical, layout


def normalise_file(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture
) -> tuple[dict[str, torch.Tensor], NormaliseInfo]:
    """``normalise_embedding`` with what ``adapters.normalise.normalise`` reports: ``rank`` = vectors."""
    canonical, layout = normalise_embedding(tensors, architecture)
    counts, dtype = summary(canonical)
    alphas = {module: float(n) for module, n in counts.items()}
    return canonical, NormaliseInfo(layout, counts, alphas, dtype, kind="embedding")


def _matrix(tensor: torch.Tensor, key: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise AdapterInvalid(
            f"{key} has shape {list(tensor.shape)}; an embedding is [vectors, width]",
            reason="shape_mismatch",
            detail={"keys": [key]},
        )
    if tensor.shape[0] > MAX_VECTORS:
        raise AdapterInvalid(
            f"{key} holds {tensor.shape[0]} vectors; a prompt fits at most {MAX_VECTORS}",
            reason="too_many_vectors",
            detail={"keys": [key], "vectors": int(tensor.shape[0]), "limit": MAX_VECTORS},
        )
    return tensor


def check_against(vectors: Mapping[str, torch.Tensor], architecture: Architecture) -> None:
    """Every text encoder of the base gets vectors as wide as its token embedding, and no other."""
    widths = text_widths(architecture)
    base = label_of(architecture.family)
    family = find_family(architecture.family)
    if family is not None and not family.embeddings:
        raise AdapterIncompatible(
            f"textual-inversion embeddings are not supported on {base} base models yet",
            reason="family_mismatch",
            detail={"base_family": architecture.family},
            hint="Use a LoRA on this family.",
        )
    extra = sorted(set(vectors) - set(widths))
    if extra:
        owners = " or ".join(label_of(f.name) for f in owners_of(extra[0])) or "another model family"
        raise AdapterIncompatible(
            f"the embedding is for {owners} base models: it has vectors for {extra[0]}, which the base "
            f"model ({base}) lacks or takes no embeddings on",
            reason="family_mismatch",
            detail={"components": extra, "base_family": architecture.family},
            hint="Use an embedding made for this base model's family.",
        )
    missing = sorted(set(widths) - set(vectors))
    if missing:
        raise AdapterIncompatible(
            f"the embedding has vectors for {', '.join(sorted(vectors))} only; the base model ({base}) also "
            f"encodes prompts with {', '.join(missing)}",
            reason="family_mismatch",
            detail={"components": missing, "base_family": architecture.family},
            hint=f"{base} takes embeddings with {' and '.join(_wanted(architecture))} vectors "
            "(A1111's SDXL layout); a one-encoder (SD1.x/SD2.x) embedding does not fit it.",
        )
    for encoder, tensor in vectors.items():
        width = int(tensor.shape[1])
        if width != widths[encoder]:
            made_for = WIDTH_FAMILIES.get(width)
            raise AdapterIncompatible(
                f"the embedding's {encoder} vectors are {width} wide"
                + (f" (as {made_for})" if made_for else "")
                + f"; the base model's {encoder} ({base}) takes {widths[encoder]}",
                reason="shape_mismatch",
                detail={"component": encoder, "width": width, "expected": widths[encoder]},
                hint="Use an embedding made for this base model's family.",
            )


def _wanted(architecture: Architecture) -> list[str]:
    """The file parts the base family takes (``clip_l``, ``clip_g`` …), for messages."""
    parts, _ = parts_of(architecture)
    return [part for part, encoder in parts.items() if part != encoder and part != "single"]


def summary(canonical: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], str]:
    """Canonical module → number of vectors, and the dtype name."""
    counts = {key: int(t.shape[0]) for key, t in sorted(canonical.items())}
    dtypes = {DTYPE_NAMES[t.dtype] for t in canonical.values()}
    if len(dtypes) != 1:
        raise AdapterInvalid(
            f"canonical adapters use one dtype, found {sorted(dtypes)}", reason="mixed_dtype"
        )
    return counts, dtypes.pop()


def check_canonical_embedding(
    tensors: Mapping[str, torch.Tensor], architecture: Architecture | None
) -> dict[str, int]:
    """A stored embedding's tensors (as on registration), → module → vectors."""
    if "text_encoder.embedding" not in tensors:
        raise AdapterInvalid("the stored embedding has no text_encoder vectors", reason="incomplete_pair")
    normalise_embedding(tensors, architecture)
    return summary(tensors)[0]


def to_a1111(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical vectors → A1111's layout: ``emb_params``, or ``clip_l`` + ``clip_g`` for two encoders."""
    if set(tensors) == {"text_encoder.embedding"}:
        return {A1111_SINGLE: tensors["text_encoder.embedding"]}
    by_encoder = {component: key for key, component in A1111_SDXL.items()}
    return {by_encoder[key.removesuffix(SUFFIX)]: t for key, t in sorted(tensors.items())}


def vectors_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors → text encoder component → ``[n, width]``."""
    return {key.removesuffix(SUFFIX): t for key, t in tensors.items() if key in CANONICAL}
