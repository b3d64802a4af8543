"""Mutations that keep a file valid: a case made only of these must register (else ``refused_valid``).

They vary what a correct reader must not care about: the header's length (padding, including lengths
whose little-endian bytes look like a pickle or zip magic), the order of the header's keys and of the
tensor data, extra metadata strings, the (consistent) dtype, raw UTF-8 instead of escapes.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from adapters.format import DEFAULT_LIMITS
from loadtests.fuzz.draft import Draft, Mutation

# header-length bytes: 0x80 then 2..5 is how a pickle starts, 'PK' a zip; the rest are plain values
LOW_BYTES = st.sampled_from([0x80, 0x50, 0x00, 0x08, 0xF8])
HIGH_BYTES = st.one_of(st.sampled_from([2, 3, 4, 5, 0x4B, 0x00, 0xFF]), st.integers(0, 255))
printable = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=200)


@st.composite
def header_length(draw: st.DrawFn) -> Mutation:
    low, high, top = draw(LOW_BYTES), draw(HIGH_BYTES), draw(st.integers(0, 3))
    target = low | high << 8 | top << 16

    def apply(d: Draft) -> None:
        length = target
        while length < len(d.text):
            length += 1 << 16
        if length <= DEFAULT_LIMITS.max_header_bytes:
            d.text += b" " * (length - len(d.text))

    return Mutation("benign", f"header_length={target:#x}", "text", apply)


@st.composite
def key_order(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["reverse_header", "reverse_data", "rotate_data", "metadata_last"]))

    def apply_header(d: Draft) -> None:
        items = list(d.header.items())
        if kind == "metadata_last":
            items.sort(key=lambda item: item[0] == "__metadata__")
        else:
            items.reverse()
        d.header = dict(items)

    def apply_tensors(d: Draft) -> None:
        items = list(d.tensors.items())
        d.tensors = dict(items[::-1] if kind == "reverse_data" else items[1:] + items[:1])

    if kind.endswith("_data"):
        return Mutation("benign", kind, "tensors", apply_tensors)
    return Mutation("benign", kind, "header", apply_header)


@st.composite
def extra_metadata(draw: st.DrawFn) -> Mutation:
    values = draw(st.lists(printable, min_size=1, max_size=20))
    title = draw(printable)

    def apply(d: Draft) -> None:
        for i, value in enumerate(values):
            d.metadata[f"note_{i}"] = value
        d.metadata["modelspec.title"] = title
        d.metadata.pop("format", None)

    return Mutation("benign", f"extra_metadata({len(values)},{title[:20]!r})", "tensors", apply)


@st.composite
def uniform_dtype(draw: st.DrawFn) -> Mutation:
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))

    def apply(d: Draft) -> None:
        d.tensors = {k: t.to(dtype) for k, t in d.tensors.items()}

    return Mutation("benign", f"dtype={dtype}", "tensors", apply)


def _raw_utf8(d: Draft) -> None:
    d.ascii_header = False


BENIGN = st.one_of(
    header_length(),
    key_order(),
    extra_metadata(),
    uniform_dtype(),
    st.just(Mutation("benign", "raw_utf8", "header", _raw_utf8)),
)
