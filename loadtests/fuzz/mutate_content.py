"""Mutations of the content: key names, tensor values, alpha, metadata, scale_default and the id.

Families: ``keys``, ``values``, ``alpha``, ``metadata`` (hostile values of the ``loraswap`` entry, the
kohya ``ss_*`` keys and the user's metadata), ``metadata_size`` (values near the header limit),
``scale`` (``scale_default`` from the argument, the user's metadata and the file) and ``ids``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from hypothesis import strategies as st

from adapters.metadata import METADATA_KEY
from basemodel.settings import Settings
from loadtests.fuzz.draft import Draft, Mutation
from loadtests.fuzz.mutate_container import picks

MAX_RANK: int = Settings.model_fields["max_lora_rank"].default  # the server's default; the fuzzer's registry


def present(d: Draft, *tensors: torch.Tensor) -> bool:
    """Every one of ``tensors`` (the objects themselves) is still in the draft, under any key."""
    held = {id(t) for t in d.tensors.values()}
    return all(id(t) in held for t in tensors)


# -- keys -----------------------------------------------------------------------------------------

KEY_KINDS: tuple[str, ...] = (
    "unknown_module",
    "unknown_layer",
    "kohya_garbage",
    "kohya_empty",
    "kohya_component",
)
KEY_KINDS += ("kohya_ldm", "suffix", "traversal", "absolute", "windows", "nul", "long", "text", "empty")
KEY_KINDS += ("dots", "metadata_name", "upper", "hada", "lora_mid", "dora", "surrogate", "fullwidth")


def hostile_name(kind: str, key: str, text: str, k: int) -> str:
    return {
        "unknown_module": f"unet.nope.block{k}.lora_A.weight",
        "unknown_layer": f"text_encoder.encoder.layers.{90 + k}.self_attn.q_proj.lora_A.weight",
        "kohya_garbage": f"lora_unet_{text}.lora_down.weight",
        "kohya_empty": "lora_unet_.lora_up.weight",
        "kohya_component": "lora_te3_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "kohya_ldm": "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
        "suffix": key + ".extra",
        "traversal": "../" * k + "etc/passwd",
        "absolute": "/etc/passwd.lora_A.weight",
        "windows": "C:\\x\\unet.lora_A.weight",
        "nul": key.replace(".", "\x00", 1),
        "long": "unet." + "a" * (k * 50) + ".lora_A.weight",
        "text": text,
        "empty": "",
        "dots": "unet..lora_A.weight",
        "metadata_name": "__metadata__",
        "upper": key.upper(),
        "hada": key.replace("lora_", "hada_w1_", 1),
        "lora_mid": key + ".lora_mid.weight",
        "dora": key.rsplit(".", 2)[0] + ".dora_scale",
        "surrogate": key + "\ud800",
        "fullwidth": key.replace("unet", "ｕｎｅｔ"),
    }[kind]


@st.composite
def rename_key(draw: st.DrawFn) -> Mutation:
    kind, pick, k = draw(st.sampled_from(KEY_KINDS)), draw(picks), draw(st.integers(1, 200))
    text = draw(st.text(max_size=40))

    def apply(d: Draft) -> None:
        keys = list(d.tensors)
        key = keys[pick % len(keys)]
        new = hostile_name(kind, key, text, k)
        d.tensors = {(new if name == key else name): t for name, t in d.tensors.items()}

    return Mutation("keys", f"rename={kind}({pick},{k},{text!r})", "tensors", apply)


def alias(key: str) -> str:
    """Another accepted spelling of the same module (a duplicate once both are present)."""
    for a, b in ((".lora_A.weight", ".lora_A.default.weight"), ("lora_te_text_model_", "lora_te_")):
        if a in key:
            return key.replace(a, b, 1)
    if key.startswith("unet."):
        return key.removeprefix("unet.")
    return "base_model.model." + key


@st.composite
def key_set(draw: st.DrawFn) -> Mutation:
    kind, pick = draw(st.sampled_from(["alias", "drop", "extra", "prefix_all", "mix_layout"])), draw(picks)
    extra = draw(st.text(min_size=1, max_size=30))

    def apply(d: Draft) -> None:
        keys = list(d.tensors)
        key = keys[pick % len(keys)]
        if kind == "alias":
            d.tensors[alias(key)] = d.tensors[key]
        elif kind == "drop" and len(keys) > 1:
            del d.tensors[key]
        elif kind == "extra":
            d.tensors[extra] = torch.zeros(2)
        elif kind == "prefix_all":
            d.tensors = {"base_model.model." + name: t for name, t in d.tensors.items()}
        elif kind == "mix_layout":
            d.tensors[
                "lora_unet_x.lora_down.weight" if "lora_unet_" not in key else "unet.x.lora_A.weight"
            ] = d.tensors[key]

    return Mutation("keys", f"{kind}({pick},{extra!r})", "tensors", apply)


KEYS = st.one_of(rename_key(), key_set())

# -- tensor values ------------------------------------------------------------------------------------

BAD_TORCH_DTYPES = [torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
BAD_TORCH_DTYPES += [torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
FINE_TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def non_finite(draw: st.DrawFn) -> Mutation:
    value, pick, at = draw(st.sampled_from([math.nan, math.inf, -math.inf])), draw(picks), draw(picks)

    def apply(d: Draft) -> None:
        keys = list(d.tensors)
        key = keys[pick % len(keys)]
        tensor = d.tensors[key].clone()
        if tensor.numel() and tensor.dtype in FINE_TORCH_DTYPES:
            tensor.view(-1)[at % tensor.numel()] = value
            d.tensors[key] = tensor
            d.must_refuse("non-finite tensor values", lambda: present(d, tensor))

    return Mutation("values", f"{value}@{pick}[{at}]", "tensors", apply)


@st.composite
def tensor_dtype(draw: st.DrawFn) -> Mutation:
    dtype, pick = draw(st.sampled_from(BAD_TORCH_DTYPES + FINE_TORCH_DTYPES)), draw(picks)

    def apply(d: Draft) -> None:
        keys = list(d.tensors)
        key = keys[pick % len(keys)]
        converted = d.tensors[key].to(dtype, copy=True)
        d.tensors[key] = converted
        if dtype not in FINE_TORCH_DTYPES:
            d.must_refuse(f"unsupported dtype {dtype}", lambda: present(d, converted))

    return Mutation("values", f"dtype={dtype}@{pick}", "tensors", apply)


RESHAPES = ("flat", "unsqueeze", "scalar", "transpose", "extra_row", "empty", "zeros", "huge", "tiny")


@st.composite
def reshape(draw: st.DrawFn) -> Mutation:
    kind, pick = draw(st.sampled_from(RESHAPES)), draw(picks)

    def apply(d: Draft) -> None:
        keys = list(d.tensors)
        key = keys[pick % len(keys)]
        t = d.tensors[key]
        if t.dtype not in FINE_TORCH_DTYPES or not t.numel():
            return
        d.tensors[key] = {
            "flat": lambda: t.reshape(-1),
            "unsqueeze": lambda: t.unsqueeze(0),
            "scalar": lambda: t.reshape(-1)[:1].reshape(()),
            "transpose": lambda: t.T.contiguous() if t.dim() == 2 else t,
            "extra_row": lambda: torch.cat([t, t[:1]]) if t.dim() else t,
            "empty": lambda: t.reshape(-1)[:0],
            "zeros": lambda: torch.zeros_like(t),
            "huge": lambda: torch.full_like(t, torch.finfo(t.dtype).max),
            "tiny": lambda: torch.full_like(t, 1e-45),
        }[kind]()

    return Mutation("values", f"reshape={kind}@{pick}", "tensors", apply)


@st.composite
def pair_rank(draw: st.DrawFn) -> Mutation:
    rank, pick = draw(st.sampled_from([0, 1, 3, 7, 64, 257, 300])), draw(picks)
    mismatch = draw(st.integers(0, 2))

    def apply(d: Draft) -> None:
        pairs = d.pairs()
        if not pairs:
            return
        down_key, up_key, _ = pairs[pick % len(pairs)]
        down, up = d.tensors[down_key], d.tensors[up_key]
        if down.dim() < 2 or up.dim() < 2 or down.dtype not in FINE_TORCH_DTYPES:
            return
        gen = torch.Generator().manual_seed(rank)
        new_down = (torch.randn((rank, *down.shape[1:]), generator=gen) * 0.01).to(down.dtype)
        b_shape = (up.shape[0], rank + mismatch, *up.shape[2:])
        new_up = (torch.randn(b_shape, generator=gen) * 0.01).to(up.dtype)
        d.tensors[down_key], d.tensors[up_key] = new_down, new_up
        if rank == 0 or mismatch or rank > MAX_RANK:
            d.must_refuse(f"rank {rank} (+{mismatch} in B)", lambda: present(d, new_down, new_up))

    return Mutation("values", f"rank={rank}+{mismatch}@{pick}", "tensors", apply)


VALUES = st.one_of(non_finite(), tensor_dtype(), reshape(), pair_rank())

# -- alpha ----------------------------------------------------------------------------------------

ALPHAS = [-4.0, -1.0, -1e-30, 0.0, 1e-45, 1e-30, 0.5, 2.0, 4.0, 8.0, 16.0, 64.0, 1e3, 65504.0]
ALPHAS += [1e10, 1e30, 3e38, 3.4028235e38]
HOSTILE_ALPHA_RATIO = 1e3  # alpha / rank above this is refused by any sane bound


@st.composite
def alpha_value(draw: st.DrawFn) -> Mutation:
    value, pick = draw(st.sampled_from(ALPHAS)), draw(picks)
    form = draw(st.sampled_from(["scalar", "vector1", "matrix1", "vector2", "int64", "file_dtype"]))

    def apply(d: Draft) -> None:
        pairs = d.pairs()
        if not pairs:
            return
        down_key, _, prefix = pairs[pick % len(pairs)]
        rank = d.tensors[down_key].shape[0] if d.tensors[down_key].dim() else 0
        file_dtype = d.tensors[down_key].dtype
        dtype = file_dtype if form == "file_dtype" and file_dtype in FINE_TORCH_DTYPES else torch.float32
        tensor = torch.tensor(value, dtype=dtype)
        alpha = {
            "scalar": tensor,
            "vector1": tensor.reshape(1),
            "matrix1": tensor.reshape(1, 1),
            "vector2": tensor.repeat(2),
            "int64": torch.tensor(int(value) if abs(value) < 1e18 else 1, dtype=torch.int64),
            "file_dtype": tensor,
        }[form]
        d.tensors[prefix + ".alpha"] = alpha
        down = d.tensors[down_key]
        stored = float(alpha.float().reshape(-1)[0])

        def still() -> bool:
            return d.tensors.get(prefix + ".alpha") is alpha and present(d, down)

        if stored <= 0 or not math.isfinite(stored) or stored / max(rank, 1) > HOSTILE_ALPHA_RATIO:
            d.must_refuse(f"alpha {stored} for rank {rank}", still)
        if form in ("vector2", "int64"):
            d.must_refuse(f"alpha as {form}", still)

    return Mutation("alpha", f"alpha={value}({form})@{pick}", "tensors", apply)


ALPHA = alpha_value()

# -- metadata -------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
HOSTILE_FIELDS: dict[str, list[Any]] = {
    "schema_version": [2, "1", None, 1.0, True, -1],
    "adapter_id": ["../../etc", "", None, 5, "A" * 1000],
    "version": [0, -1, 2**70, "3", None, 1.5],
    "title": [None, 5, [], {"a": 1}, "\x00", "\ud800", "🦊" * 100, "t" * 5000],
    "description": [[], "\u202e" * 50, "x" * 20000],
    "created_at": ["nope", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00", 1e20, -1, "2024-02-30T00:00:00Z"],
    "base_model": [None, {}, {"name": "x", "architecture_id": "ffff"}, {"name": "x", "fingerprint": "zz"}],
    "base_model_match": ["yes", 2, None],
    "source_format": ["pickle", "", None, "kohya"],
    "target_modules": [["../x"], "x", [1], ["unet.nope"]],
    "rank": [0, -1, 10**9, "x", None, 1e300],
    "alpha": [NAN, INF, -INF, -1, 0, 1e38, "x", None],
    "rank_pattern": [{"x": -1}, {"x": "y"}, [], {"unet.nope": 3}],
    "alpha_pattern": [{"x": NAN}, {"x": "y"}, {"x": INF}],
    "dtype": ["fp8", "", None, "fp32"],
    "trigger_words": ["x", [1], [None], ["a" * 1000] * 10, []],
    "training": [{"steps": -1}, {"steps": "x"}, {"learning_rate": NAN}, {"seed": 2**80}, "x"],
    "dataset": [{"num_images": -5}, {"sha256": 7}, {"extra": {"a": [1, {"b": None}]}}],
    "evaluation": [{"metrics": {"fid": NAN}}, {"metrics": {"fid": "x"}}, {"metrics": []}],
    "inference": [{"prompts": [1]}, {"seeds": [-1]}, {"seeds": [2**70]}, {"width": -8}, {"steps": 10**12}],
    "unknown_field": [1],
}
USER_FIELDS = ("title", "description", "trigger_words", "training", "dataset", "evaluation", "inference")
KOHYA_KEYS = ["ss_steps", "ss_epoch", "ss_learning_rate", "ss_seed", "ss_mixed_precision"]
KOHYA_KEYS += ["ss_lr_scheduler", "ss_training_started_at", "ss_new_sd_model_hash", "modelspec.title"]
KOHYA_KEYS += ["ss_output_name", "ss_network_dim", "ss_network_alpha", "sshs_model_hash", "ss_tag_frequency"]
KOHYA_VALUES = ["", "None", "nan", "inf", "-inf", "1e400", "-1", "9" * 5000, "0x10", "1_000", " 12 "]
KOHYA_VALUES += ["１２", "\x00", '{"a": [1, 2]}', "🦊", "\ud800", "a" * 100_000, "1e20", "-1e20"]


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def embedded_metadata(d: Draft) -> dict[str, Any]:
    """The file's ``loraswap`` entry as an object ({} when absent or not an object)."""
    try:
        value = json.loads(d.metadata.get(METADATA_KEY, "{}"))
    except (ValueError, RecursionError):  # a nesting mutation ran first
        return {}
    return value if isinstance(value, dict) else {}


@st.composite
def loraswap_field(draw: st.DrawFn) -> Mutation:
    name = draw(st.sampled_from(sorted(HOSTILE_FIELDS)))
    value = draw(st.sampled_from(HOSTILE_FIELDS[name]))

    def apply(d: Draft) -> None:
        d.metadata[METADATA_KEY] = dumps({**embedded_metadata(d), name: value})

    return Mutation("metadata", f"loraswap.{name}={value!r:.40}", "tensors", apply)


@st.composite
def loraswap_entry(draw: st.DrawFn) -> Mutation:
    text = draw(st.sampled_from(["", "null", "[]", '"x"', "1", "{", "NaN", '{"schema_version": 1}', "{}"]))

    def apply(d: Draft) -> None:
        d.metadata[METADATA_KEY] = text

    return Mutation("metadata", f"loraswap={text!r}", "tensors", apply)


@st.composite
def kohya_key(draw: st.DrawFn) -> Mutation:
    key, value = draw(st.sampled_from(KOHYA_KEYS)), draw(st.sampled_from(KOHYA_VALUES))

    def apply(d: Draft) -> None:
        d.metadata[key] = value

    return Mutation("metadata", f"{key}={value!r:.40}", "tensors", apply)


@st.composite
def user_metadata(draw: st.DrawFn) -> Mutation:
    name = draw(st.sampled_from([*USER_FIELDS, "alpha", "rank", "unknown_field", "schema_version"]))
    value = draw(st.sampled_from(HOSTILE_FIELDS[name]))
    as_text = draw(st.booleans())

    def apply(d: Draft) -> None:
        d.metadata_arg = dumps({name: value}) if as_text else {name: value}

    return Mutation("metadata", f"arg.{name}={value!r:.40}({'text' if as_text else 'dict'})", "args", apply)


@st.composite
def user_metadata_text(draw: st.DrawFn) -> Mutation:
    text = draw(st.sampled_from(["", "null", "[]", "[1]", '"x"', "{", "NaN", "{}", '{"title": NaN}']))

    def apply(d: Draft) -> None:
        d.metadata_arg = text

    return Mutation("metadata", f"arg={text!r}", "args", apply)


METADATA = st.one_of(loraswap_field(), loraswap_entry(), kohya_key(), user_metadata(), user_metadata_text())

# -- metadata near the size limits ------------------------------------------------------------------

SIZES = [300_000, 400_000, 520_000, 600_000, 900_000, 1_100_000]
CHARS = ["t", "€", "🦊", "\\"]


@st.composite
def metadata_size(draw: st.DrawFn) -> Mutation:
    where = draw(st.sampled_from(["arg_title", "arg_description", "arg_trigger_words", "file_title"]))
    where = where if where != "file_title" else draw(st.sampled_from(["file_title", "modelspec_title"]))
    size, char = draw(st.sampled_from(SIZES)), draw(st.sampled_from(CHARS))
    n = size // len(char.encode())

    def apply_args(d: Draft) -> None:
        field = where.removeprefix("arg_")
        d.metadata_arg = {field: [char * 8] * (n // 8) if field == "trigger_words" else char * n}

    def apply_file(d: Draft) -> None:
        if where == "modelspec_title":
            d.metadata["modelspec.title"] = char * n
        else:
            d.metadata[METADATA_KEY] = dumps({**embedded_metadata(d), "title": char * n})

    label = f"{where}={char!r}x{n}"
    if where.startswith("arg_"):
        return Mutation("metadata_size", label, "args", apply_args)
    return Mutation("metadata_size", label, "tensors", apply_file)


METADATA_SIZE = metadata_size()

# -- scale_default --------------------------------------------------------------------------------

SCALES: list[float | None] = [
    NAN,
    INF,
    -INF,
    1e308,
    -1e308,
    100.0,
    -5.0,
    4.000001,
    -4.000001,
    4.0,
    -4.0,
    0.0,
    0.5,
    -0.0,
]
SCALES += [1e-300, 5e-324, None]


@st.composite
def scale_default(draw: st.DrawFn) -> Mutation:
    where = draw(st.sampled_from(["arg", "user_dict", "user_text", "file"]))
    value = draw(st.sampled_from(SCALES))

    def apply_args(d: Draft) -> None:
        if where == "arg":
            d.scale_arg = value
        else:
            metadata = {"scale_default": value}
            d.metadata_arg = dumps(metadata) if where == "user_text" else metadata

    def apply_file(d: Draft) -> None:
        d.metadata[METADATA_KEY] = dumps({**embedded_metadata(d), "scale_default": value})

    if where == "file":
        return Mutation("scale", f"file={value}", "tensors", apply_file)
    return Mutation("scale", f"{where}={value}", "args", apply_args)


SCALE = scale_default()

# -- ids ------------------------------------------------------------------------------------------

HOSTILE_IDS = [
    "..",
    "a/b",
    "a\x00",
    "A",
    "a" * 65,
    "-a",
    "a..b",
    ".a",
    "",
    " a",
    "a\n",
    "ａ",
    "con",
    "a" * 64,
]


@st.composite
def adapter_id(draw: st.DrawFn) -> Mutation:
    value = draw(st.one_of(st.sampled_from(HOSTILE_IDS), st.text(max_size=70)))

    def apply(d: Draft) -> None:
        d.adapter_id = value

    return Mutation("ids", f"id={value!r:.40}", "args", apply)


IDS = adapter_id()
