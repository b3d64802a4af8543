"""One minimal, fixed input per known adapter defect (``known.ADAPTER_DEFECTS``).

The fuzz runs find these by chance; the reproducers make every known defect checkable at once and
deterministically: ``python -m loadtests.fuzz adapters --reproducers`` and the bounded tests run them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import torch

from adapters.identity import BaseIdentity
from adapters.metadata import METADATA_KEY
from loadtests.fuzz.draft import UNSET, Case
from loadtests.fuzz.seeds import Seed, assemble, encode, header_text, make_seeds, serialise


def _case(key: str, data: bytes, **kwargs: object) -> Case:
    fields: dict[str, object] = {"adapter_id": "repro", "metadata": None, "scale_default": None}
    fields |= {"refuse": (), "expect_scale": UNSET, "must_register": False} | kwargs
    return Case(seed=key, labels=(f"reproducer:{key}",), data=data, **fields)  # type: ignore[arg-type]


def deep_json(seeds: dict[str, Seed]) -> Case:
    """Issue 12's example: a header of 100,000 '[' and as many ']'."""
    return _case("deep-json", assemble(b"[" * 100_000 + b"]" * 100_000, b""), refuse=("deep JSON",))


def metadata_size(seeds: dict[str, Seed]) -> Case:
    """Issue 12's example: a 600,000-character title, written twice into the stored header."""
    seed = seeds["kohya-f32"]
    return _case("metadata-size", serialise(seed.tensors, seed.metadata), metadata={"title": "t" * 600_000})


def scale_default(seeds: dict[str, Seed]) -> Case:
    seed = seeds["kohya-f32"]
    return _case(
        "scale-default", serialise(seed.tensors, seed.metadata), scale_default=1e308, refuse=("1e308",)
    )


def alpha_bound(seeds: dict[str, Seed]) -> Case:
    """Issue 12's example: kohya alpha -4."""
    seed = seeds["kohya-f32"]
    tensors = {k: (torch.tensor(-4.0) if k.endswith(".alpha") else t) for k, t in seed.tensors.items()}
    return _case("alpha-bound", serialise(tensors, seed.metadata), refuse=("alpha -4",))


def dtype_unhashable(seeds: dict[str, Seed]) -> Case:
    """A header entry with ``"dtype": ["F32"]``."""
    seed = seeds["diffusers-f32"]
    header, data = encode(seed.tensors, seed.metadata)
    header[next(k for k in header if k != "__metadata__")]["dtype"] = ["F32"]
    return _case("dtype-unhashable", assemble(header_text(header), data), refuse=("dtype list",))


def pickle_lookalike(seeds: dict[str, Seed]) -> Case:
    """A valid file whose 8-byte header length is 0x…0480: its first bytes are 0x80 0x04."""
    seed = seeds["kohya-f32"]
    header, data = encode(seed.tensors, seed.metadata)
    text = header_text(header)
    length = 0x480
    while length < len(text):
        length += 1 << 16
    blob = assemble(text + b" " * (length - len(text)), data)
    assert blob[:2] == struct.pack("<H", 0x480)
    return _case("pickle-lookalike", blob, must_register=True)


def non_finite_metadata(seeds: dict[str, Seed]) -> Case:
    seed = seeds["kohya-f32"]
    metadata = '{"evaluation": {"metrics": {"fid": NaN}}}'
    return _case("non-finite-metadata", serialise(seed.tensors, seed.metadata), metadata=metadata)


def surrogate_metadata(seeds: dict[str, Seed]) -> Case:
    """A file whose ``loraswap`` entry is ``{"title": "\\ud800"}``: valid JSON, a lone surrogate parsed."""
    seed = seeds["loraswap"]
    entry = json.loads(seed.metadata[METADATA_KEY]) | {"title": "\ud800"}
    metadata = seed.metadata | {METADATA_KEY: json.dumps(entry)}
    return _case("surrogate-metadata", serialise(seed.tensors, metadata))


REPRODUCERS: dict[str, Callable[[dict[str, Seed]], Case]] = {
    "deep-json": deep_json,
    "metadata-size": metadata_size,
    "scale-default": scale_default,
    "alpha-bound": alpha_bound,
    "dtype-unhashable": dtype_unhashable,
    "pickle-lookalike": pickle_lookalike,
    "non-finite-metadata": non_finite_metadata,
    "surrogate-metadata": surrogate_metadata,
}


def reproducer_cases(base: BaseIdentity) -> dict[str, Case]:
    """Every reproducer, built from the seeds for ``base``."""
    seeds = {seed.name: seed for seed in make_seeds(base)}
    return {key: build(seeds) for key, build in REPRODUCERS.items()}
