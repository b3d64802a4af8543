"""Mutations of the container: the length field and the bytes, the header object, its JSON text, nesting.

Families: ``container`` (file stage), ``header`` (header object), ``json`` (header text), ``nesting``
(deeply nested JSON in the header, in ``__metadata__`` and in the ``loraswap`` entry).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from adapters.format import SAFETENSORS_DTYPES
from loadtests.fuzz.draft import Draft, Mutation

ACCEPTED_DTYPES = set(SAFETENSORS_DTYPES)
picks = st.integers(min_value=0, max_value=1 << 16)
depths = st.sampled_from([64, 200, 1_000, 5_000, 100_000])


def _holds(d: Draft, name: str | None, entry: Any, key: str, value: Any) -> bool:
    """Entry ``name`` is still ``entry`` and still has ``key`` set to ``value`` (same object)."""
    return (
        name is not None
        and d.header.get(name) is entry
        and isinstance(entry, dict)
        and entry.get(key) is value
    )


def _entry(d: Draft, pick: int, listed: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """The ``pick``-th tensor entry of the header while it is still an object (whose ``listed`` is a list)."""
    name = _nth(d.entries(), pick)
    entry = d.header.get(name) if name else None
    if not isinstance(entry, dict) or (listed is not None and not isinstance(entry.get(listed), list)):
        return name, None
    return name, entry


def changed(value: Any, before: Any) -> bool:
    """Whether ``value`` reads differently from ``before`` as JSON (2.0 is not 2; [] floated is [])."""
    return json.dumps(value) != json.dumps(before)


def _ints(values: list[Any], length: int | None = None) -> bool:
    """Plain ints (an earlier mutation may have left floats, strings, lists …), ``length`` of them."""
    return all(type(v) is int for v in values) and (length is None or len(values) == length)


def _nth(items: list[str], pick: int) -> str | None:
    return items[pick % len(items)] if items else None


# -- container (file stage) -------------------------------------------------------------------------

LENGTHS = ("zero", "small", "minus", "plus", "whole", "huge", "max", "over_limit")


@st.composite
def length_field(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(LENGTHS))
    delta = draw(st.integers(1, 64))

    def apply(d: Draft) -> None:
        n = len(d.text)
        value = {
            "zero": 0,
            "small": delta % 8,
            "minus": n - min(delta, n),
            "plus": n + delta,
            "whole": n + len(d.data),
            "huge": (1 << 63) + delta,
            "max": (1 << 64) - 1,
            "over_limit": (1 << 20) + delta,
        }[kind]
        if value != n:
            d.blob = struct.pack("<Q", value) + d.blob[8:]
            d.must_refuse("header length field is wrong")

    return Mutation("container", f"length={kind}{delta}", "file", apply)


@st.composite
def truncate_file(draw: st.DrawFn) -> Mutation:
    pick = draw(picks)

    def apply(d: Draft) -> None:
        if d.blob:
            d.blob = d.blob[: pick % len(d.blob)]
            d.must_refuse("file truncated")

    return Mutation("container", f"truncate@{pick}", "file", apply)


@st.composite
def extend_file(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["junk", "zeros", "copy", "spaces"]))
    junk = draw(st.binary(min_size=1, max_size=64))

    def apply(d: Draft) -> None:
        tail = {"junk": junk, "zeros": bytes(len(junk)), "copy": d.blob, "spaces": b" " * len(junk)}[kind]
        d.blob += tail
        d.must_refuse("trailing bytes after the tensor data")

    return Mutation("container", f"extend={kind}{len(junk)}", "file", apply)


@st.composite
def magic_bytes(draw: st.DrawFn) -> Mutation:
    magic = draw(st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05"]))

    def apply(d: Draft) -> None:
        if d.blob.startswith(magic):  # a valid file already starts so (header length 0x280 is 80 02 …)
            return
        d.blob = magic + d.blob[len(magic) :]
        d.must_refuse("pickle / zip magic")

    return Mutation("container", f"magic={magic!r}", "file", apply)


@st.composite
def flip_byte(draw: st.DrawFn) -> Mutation:
    pick, mask = draw(picks), draw(st.integers(1, 255))

    def apply(d: Draft) -> None:
        if d.blob:
            raw = bytearray(d.blob)
            raw[pick % len(raw)] ^= mask
            d.blob = bytes(raw)

    return Mutation("container", f"flip@{pick}^{mask}", "file", apply)


@st.composite
def tiny_file(draw: st.DrawFn) -> Mutation:
    blob = draw(st.sampled_from([b"", b"\x00" * 8, b"\x02" + b"\x00" * 7 + b"{}", b"\xff" * 7]))

    def apply(d: Draft) -> None:
        d.blob = blob
        d.must_refuse("no tensors")

    return Mutation("container", f"file={blob!r}", "file", apply)


CONTAINER = st.one_of(length_field(), truncate_file(), extend_file(), magic_bytes(), flip_byte(), tiny_file())

# -- header object (header stage) ---------------------------------------------------------------------

OFFSETS = ["negative", "swapped", "empty", "beyond", "overlap", "float", "string", "short", "long"]
OFFSETS += ["huge", "null", "shift", "bool"]


@st.composite
def offsets(draw: st.DrawFn) -> Mutation:
    kind, pick, k = draw(st.sampled_from(OFFSETS)), draw(picks), draw(st.integers(1, 4096))

    def apply(d: Draft) -> None:
        name, entry = _entry(d, pick, "data_offsets")
        if entry is None or not _ints(entry["data_offsets"], 2):
            return
        begin, end = entry["data_offsets"]
        other = d.header.get(_nth([n for n in d.entries() if n != name], pick) or "", entry)
        value: Any = {
            "negative": [-k, end],
            "swapped": [max(begin, end), min(begin, end)],
            "empty": [begin, begin],
            "beyond": [begin, len(d.data) + k],
            "overlap": other["data_offsets"] if isinstance(other, dict) else [0, 0],
            "float": [float(begin), float(end)],
            "string": [str(begin), str(end)],
            "short": [begin],
            "long": [begin, end, end],
            "huge": [begin, end + (1 << 64)],
            "null": None,
            "shift": [begin + k, end + k],
            "bool": [False, True],
        }[kind]
        if changed(value, [begin, end]):
            entry["data_offsets"] = value
            d.must_refuse("tensor offsets are wrong", lambda: _holds(d, name, entry, "data_offsets", value))

    return Mutation("header", f"offsets={kind}({k})", "header", apply)


BAD_DTYPES = ["F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "U64"]
BAD_DTYPES += ["F32 ", "f32", "float32", "", "F32\x00", "ＦＯ"]
DTYPE_VALUES: list[Any] = [*BAD_DTYPES, None, 4, ["F32"], {"F32": 1}, "F32", "F16", "BF16"]


@st.composite
def dtype_name(draw: st.DrawFn) -> Mutation:
    value, pick = draw(st.sampled_from(DTYPE_VALUES)), draw(picks)

    def apply(d: Draft) -> None:
        name, entry = _entry(d, pick)
        if entry is None:
            return
        before = entry.get("dtype")
        entry["dtype"] = value
        same_size = SAFETENSORS_DTYPES.get(str(before)) == SAFETENSORS_DTYPES.get(str(value))
        if not (isinstance(value, str) and value in ACCEPTED_DTYPES and same_size):
            d.must_refuse(f"dtype {value!r}", lambda: _holds(d, name, entry, "dtype", value))

    return Mutation("header", f"dtype={value!r}", "header", apply)


SHAPES = ["scalar", "flat", "reversed", "huge", "huge1", "negative", "float", "string", "null", "nested"]
SHAPES += ["many_dims", "zero", "bigint"]


@st.composite
def shape(draw: st.DrawFn) -> Mutation:
    kind, pick, k = draw(st.sampled_from(SHAPES)), draw(picks), draw(st.integers(1, 2000))

    def apply(d: Draft) -> None:
        name, entry = _entry(d, pick, "shape")
        if entry is None or not _ints(entry["shape"]):
            return
        dims = entry["shape"]
        numel = math.prod(dims)
        value: Any = {
            "scalar": [],
            "flat": [numel],
            "reversed": dims[::-1],
            "huge": [1 << 40, 1 << 40],
            "huge1": [(1 << 62) + k],
            "negative": [-1, *dims],
            "float": [float(x) for x in dims],
            "string": [str(x) for x in dims],
            "null": None,
            "nested": [dims],
            "many_dims": [1] * k + dims,
            "zero": [0, *dims],
            "bigint": [10**30, *dims],
        }[kind]
        entry["shape"] = value
        refused = ("huge", "huge1", "negative", "float", "string", "null", "nested", "zero", "bigint")
        if kind in refused and changed(value, dims):
            d.must_refuse(
                "shape does not match the byte count", lambda: _holds(d, name, entry, "shape", value)
            )

    return Mutation("header", f"shape={kind}({k})", "header", apply)


ENTRY_VALUES: list[Any] = ["x", [], None, 1, {}, True]


@st.composite
def entry_structure(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["replace", "extra_key", "drop_key", "remove", "duplicate", "zero_size"]))
    value, pick, k = draw(st.sampled_from(ENTRY_VALUES)), draw(picks), draw(st.integers(1, 2000))

    def apply(d: Draft) -> None:
        name = _nth(d.entries(), pick)
        if name is None:
            return
        entry: Any = d.header[name]
        still: Callable[[], bool]
        if kind == "replace":
            d.header[name] = value
            still = lambda: d.header.get(name) is value  # noqa: E731
        elif kind == "extra_key" and isinstance(entry, dict):
            entry["extra"] = value
            still = lambda: _holds(d, name, entry, "extra", value)  # noqa: E731
        elif kind == "drop_key" and isinstance(entry, dict) and entry:
            dropped = sorted(entry)[pick % len(entry)]
            entry.pop(dropped)
            still = lambda: dropped not in entry and d.header.get(name) is entry  # noqa: E731
        elif kind == "remove":
            del d.header[name]
            still = lambda: name not in d.header  # noqa: E731
        elif kind == "duplicate":
            d.header[f"{name}.copy"] = entry
            still = lambda: d.header.get(f"{name}.copy") is d.header.get(name)  # noqa: E731
        elif kind == "zero_size":  # k empty tensors at the end: a valid container, unknown keys
            end = len(d.data)
            zero = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
            for i in range(k):
                d.header[f"z{i}"] = dict(zero)
            still = lambda: d.header.get("z0") == zero  # noqa: E731
        else:
            return
        d.must_refuse(f"header entry {kind}", still)

    return Mutation("header", f"entry={kind}({value!r},{k})", "header", apply)


METADATA_OBJECTS: list[Any] = [[], "x", 7, True, {"k": 1}, {"k": None}, {"k": ["a"]}, {"k": {"a": "b"}}]
METADATA_OBJECTS += [{"k": 1.5}, {"loraswap": {"title": "t"}}, None, {}, 0, "", False]


@st.composite
def metadata_object(draw: st.DrawFn) -> Mutation:
    value = draw(st.sampled_from(METADATA_OBJECTS))

    def apply(d: Draft) -> None:
        d.header["__metadata__"] = value
        if value and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            d.must_refuse(
                "__metadata__ is not a str -> str map", lambda: d.header.get("__metadata__") is value
            )

    return Mutation("header", f"__metadata__={value!r}", "header", apply)


@st.composite
def only_metadata(draw: st.DrawFn) -> Mutation:
    keep_data = draw(st.booleans())

    def apply(d: Draft) -> None:
        removed = d.entries()
        d.header = {"__metadata__": d.header.get("__metadata__", {})}
        if not keep_data:
            d.data = b""
        d.must_refuse("no tensors", lambda: not any(name in d.header for name in removed))

    return Mutation("header", f"only_metadata(keep_data={keep_data})", "header", apply)


HEADER = st.one_of(offsets(), dtype_name(), shape(), entry_structure(), metadata_object(), only_metadata())

# -- header JSON text (text stage) --------------------------------------------------------------------

NUMBER_LITERALS = ["1e999", "-0", "0.0", "00", "9" * 5000, "NaN", "Infinity", "-Infinity", "0e0", "1E400"]
NUMBER_LITERALS += ["0x10", "+0", ".0"]
TOP_LEVEL = [b"[]", b'"header"', b"null", b"1", b"true", b"[{}]", b"{", b"}", b"{}"]


TEXT_KINDS = ["truncate", "duplicate_entry", "duplicate_metadata", "invalid_utf8", "bom", "lead_space"]
TEXT_KINDS += ["nul_pad", "top_level", "number", "trailing_comma", "comment", "escape_keys"]


@st.composite
def json_text(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(TEXT_KINDS))
    pick = draw(picks)
    literal = draw(st.sampled_from(NUMBER_LITERALS))
    top = draw(st.sampled_from(TOP_LEVEL))
    junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))

    def apply(d: Draft) -> None:
        text = d.text
        if kind == "truncate":
            d.text = text[: pick % max(1, len(text.rstrip(b" ")))]
            d.must_refuse("header JSON truncated")
        elif kind == "duplicate_entry":
            fake = json.dumps(_first_key(d)).encode() + b':{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            d.text = b"{" + fake + text[1:]
        elif kind == "duplicate_metadata":
            d.text = b'{"__metadata__":{"loraswap":"[1]","format":"x"},' + text[1:]
        elif kind == "invalid_utf8":
            at = pick % len(text)
            d.text = text[:at] + junk + text[at:]
            d.must_refuse("header is not UTF-8")
        elif kind == "bom":
            d.text = b"\xef\xbb\xbf" + text
            d.must_refuse("header starts with a BOM")
        elif kind == "lead_space":
            d.text = b" \n\t" + text
        elif kind == "nul_pad":
            d.text = text.rstrip(b" ") + b"\x00" * 8
            d.must_refuse("header padded with NUL")
        elif kind == "top_level":
            d.text = top
            d.must_refuse("header is not a tensor map")
        elif kind == "number":
            d.text = re.sub(rb"\[0,", b"[" + literal.encode() + b",", text, count=1)
        elif kind == "trailing_comma":
            d.text = text.rstrip(b" ")[:-1] + b",}"
            d.must_refuse("trailing comma")
        elif kind == "comment":
            d.text = b"{/* c */" + text[1:]
            d.must_refuse("comment in JSON")
        elif kind == "escape_keys":
            d.text = text.replace(b'"unet', b'"\\u0075net').replace(b'"lora_', b'"\\u006cora_')

    return Mutation("json", f"{kind}({pick},{literal[:12]},{top!r},{junk!r})", "text", apply)


def _first_key(d: Draft) -> str:
    return next(iter(d.entries()), "x")


JSON_TEXT = json_text()

# -- nesting ------------------------------------------------------------------------------------------


METADATA_OPEN = b'{"__metadata__":{'


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def nesting(draw: st.DrawFn) -> Mutation:
    where = draw(
        st.sampled_from(["header_array", "header_object", "entry", "metadata_value", "loraswap", "arg_text"])
    )
    depth = draw(depths)
    shape_ = draw(st.sampled_from(["array", "object"]))
    nested = nested_array(depth) if shape_ == "array" else nested_object(depth)

    def apply_text(d: Draft) -> None:
        if where == "header_array":
            d.text = nested_array(depth).encode()
        elif where == "header_object":
            d.text = nested_object(depth).encode()
        elif where == "entry":
            d.text = b'{"deep":' + nested.encode() + b"," + d.text[1:]
        elif where == "metadata_value":
            if not d.text.startswith(METADATA_OPEN):
                return
            rest = d.text.removeprefix(METADATA_OPEN)
            d.text = (
                METADATA_OPEN + b'"k":' + nested.encode() + (b"" if rest.startswith(b"}") else b",") + rest
            )
        d.must_refuse("deeply nested header JSON")

    def apply_tensors(d: Draft) -> None:
        # nested JSON inside a metadata *string*: parsed by the registry, not by the container check
        d.metadata["loraswap"] = '{"training": {"deep": ' + nested + "}}"

    def apply_args(d: Draft) -> None:
        d.metadata_arg = '{"training": {"deep": ' + nested + "}}"

    label = f"{where}({shape_},{depth})"
    if where == "loraswap":
        return Mutation("nesting", label, "tensors", apply_tensors)
    if where == "arg_text":
        return Mutation("nesting", label, "args", apply_args)
    return Mutation("nesting", label, "text", apply_text)


NESTING = nesting()
