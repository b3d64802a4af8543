"""Valid adapter files for a base architecture: the starting points the adapter fuzzer mutates.

Each ``Seed`` is a LoRA in one accepted layout (PEFT/diffusers with and without ``.alpha``, unprefixed
PEFT, legacy diffusers, kohya in fp32 and bf16, and our canonical layout with ``loraswap`` metadata),
or a LyCORIS LoHa / LoKr in kohya naming,
over a few small modules of the base: linear layers of the UNet and the text encoder, a 1x1 conv and
a 3x3 conv (LoCon). ``encode`` serialises tensors the way safetensors does, but by hand, so that the
mutators can reach every field of the header and every byte of the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

from adapters.format import read_header, write_adapter
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, InferencePlan, TrainingInfo

# torch dtype -> safetensors dtype name; the unsupported ones are there for the mutators.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
RANK = 2
ALPHA = 3.0


@dataclass(frozen=True)
class Seed:
    """A valid adapter: its tensors (in file order) and its ``__metadata__`` strings."""

    name: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def encode(tensors: dict[str, torch.Tensor], metadata: Any) -> tuple[dict[str, Any], bytes]:
    """(header object, data area) for ``tensors`` laid out contiguously in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        raw = tensor_bytes(tensor)
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def header_text(header: Any, *, ascii: bool = True) -> bytes:
    """JSON of the header, space-padded to 8 bytes. ASCII (escapes) by default; raw UTF-8 on request,
    unless a string holds a lone surrogate (which only an escape can express)."""
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=ascii, allow_nan=True).encode()
    except UnicodeEncodeError:
        text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    return text + b" " * (-len(text) % 8)


def assemble(text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text + data


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    header, data = encode(tensors, metadata)
    return assemble(header_text(header), data)


# -- the seeds ------------------------------------------------------------------------------------


def pick_modules(base: BaseIdentity) -> list[str]:
    """A few small modules of each kind: UNet linear, text-encoder linear, 1x1 conv, 3x3 conv."""
    modules = base.architecture.modules

    def first(predicate: Callable[[str, tuple[int, ...]], bool]) -> str:
        for name, shape in modules.items():
            if max(shape[:2]) <= 128 and predicate(name, shape):
                return name
        raise LookupError("the base model lacks a module the fuzz seeds need")

    return [
        first(lambda n, s: n.startswith("unet.") and len(s) == 2 and n.endswith("to_q")),
        first(lambda n, s: n.startswith("unet.") and len(s) == 2 and n.endswith("to_k")),
        first(lambda n, s: n.startswith("text_encoder.") and len(s) == 2),
        first(lambda n, s: len(s) == 4 and s[2:] == (1, 1)),
        first(lambda n, s: len(s) == 4 and s[2:] == (3, 3) and s[1] > 4),
    ]


def lora_pairs(
    base: BaseIdentity, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (lora_A, lora_B) of rank ``RANK`` with small random values (deterministic)."""
    gen = torch.Generator().manual_seed(1212)
    pairs = {}
    for module in pick_modules(base):
        shape = base.architecture.modules[module]
        a_shape: tuple[int, ...]
        b_shape: tuple[int, ...]
        if len(shape) == 2:
            a_shape, b_shape = (RANK, shape[1]), (shape[0], RANK)
        else:
            a_shape, b_shape = (RANK, shape[1], *shape[2:]), (shape[0], RANK, 1, 1)
        down = (torch.randn(a_shape, generator=gen) * 0.05).to(dtype)
        up = (torch.randn(b_shape, generator=gen) * 0.05).to(dtype)
        pairs[module] = (down, up)
    return pairs


def _alpha(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(ALPHA, dtype=dtype)


def diffusers_seed(base: BaseIdentity, *, alpha: bool, dtype: torch.dtype) -> Seed:
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up) in lora_pairs(base, dtype).items():
        tensors[f"{module}.lora_A.weight"] = down
        tensors[f"{module}.lora_B.weight"] = up
        if alpha:
            tensors[f"{module}.alpha"] = _alpha(dtype)
    name = f"diffusers{'-alpha' if alpha else ''}-{DTYPE_CODES[dtype].lower()}"
    return Seed(name, tensors, {"format": "pt"})


def peft_unprefixed_seed(base: BaseIdentity) -> Seed:
    """PEFT ``base_model.model.<path>.lora_A.default.weight`` without the component (UNet modules)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up) in lora_pairs(base).items():
        component, path = module.split(".", 1)
        if component == "unet":
            tensors[f"base_model.model.{path}.lora_A.default.weight"] = down
            tensors[f"base_model.model.{path}.lora_B.default.weight"] = up
    return Seed("peft-unprefixed", tensors, {})


def legacy_seed(base: BaseIdentity) -> Seed:
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up) in lora_pairs(base).items():
        tensors[f"{module}.lora.down.weight"] = down
        tensors[f"{module}.lora.up.weight"] = up
        tensors[f"{module}.alpha"] = _alpha(torch.float32)
    return Seed("diffusers-legacy", tensors, {})


def kohya_name(module: str) -> str:
    component, path = module.split(".", 1)
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")


def kohya_seed(base: BaseIdentity, dtype: torch.dtype) -> Seed:
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up) in lora_pairs(base, dtype).items():
        name = kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = _alpha(dtype)
    metadata = {
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(ALPHA),
        "ss_steps": "1200",
        "ss_learning_rate": "0.0001",
        "ss_seed": "42",
        "ss_training_started_at": "1700000000.5",
        "ss_new_sd_model_hash": base.fingerprint,
        "modelspec.title": "kohya fuzz seed",
    }
    return Seed(f"kohya-{DTYPE_CODES[dtype].lower()}", tensors, metadata)


def loraswap_seed(base: BaseIdentity) -> Seed:
    """Our canonical layout, written by ``write_adapter`` with a full ``loraswap`` metadata entry."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up) in lora_pairs(base).items():
        tensors[f"{module}.lora_A.weight"] = down
        tensors[f"{module}.lora_B.weight"] = up
    metadata = AdapterMetadata(
        title="canonical fuzz seed",
        description="written by loadtests.fuzz.seeds",
        base_model=base.info(),
        source_format="loraswap",
        scale_default=0.8,
        trigger_words=["fuzzword"],
        training=TrainingInfo(steps=10, learning_rate=1e-4, seed=3),
        inference=InferencePlan(prompts=["a fox"], steps=4),
    )
    data = write_adapter(None, tensors, metadata)
    _, header = read_header(data)
    return Seed("loraswap", safetensors.torch.load(data), header)


def loha_seed(base: BaseIdentity) -> Seed:
    """A LoHa in kohya/LyCORIS naming (``hada_w1_a`` …, ``.alpha``; flattened factors for the convs)."""
    gen = torch.Generator().manual_seed(1313)
    tensors: dict[str, torch.Tensor] = {}
    for module in pick_modules(base):
        shape = base.architecture.modules[module]
        name = kohya_name(module)
        flat = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        for i in (1, 2):
            tensors[f"{name}.hada_w{i}_a"] = torch.randn(shape[0], RANK, generator=gen) * 0.2
            tensors[f"{name}.hada_w{i}_b"] = torch.randn(RANK, flat, generator=gen) * 0.2
        tensors[f"{name}.alpha"] = _alpha(torch.float32)
    return Seed("loha", tensors, {"ss_network_module": "lycoris.kohya"})


def lokr_seed(base: BaseIdentity) -> Seed:
    """A LoKr in kohya/LyCORIS naming: a full ``lokr_w1`` and a low-rank ``lokr_w2_a``/``lokr_w2_b``."""
    gen = torch.Generator().manual_seed(1414)
    tensors: dict[str, torch.Tensor] = {}
    for module in pick_modules(base):
        shape = base.architecture.modules[module]
        name = kohya_name(module)
        a, c = _divisor(shape[0]), _divisor(shape[1])
        kernel = shape[2] * shape[3] if len(shape) == 4 else 1
        tensors[f"{name}.lokr_w1"] = torch.randn(a, c, generator=gen) * 0.2
        tensors[f"{name}.lokr_w2_a"] = torch.randn(shape[0] // a, RANK, generator=gen) * 0.2
        tensors[f"{name}.lokr_w2_b"] = torch.randn(RANK, shape[1] // c * kernel, generator=gen) * 0.2
        tensors[f"{name}.alpha"] = _alpha(torch.float32)
    return Seed("lokr", tensors, {"ss_network_module": "lycoris.kohya"})


def _divisor(n: int) -> int:
    """The largest divisor of ``n`` not above its square root (LyCORIS's balanced factorisation)."""
    return max(m for m in range(1, int(n**0.5) + 1) if n % m == 0)


def make_seeds(base: BaseIdentity) -> list[Seed]:
    """Every seed; each registers successfully against ``base`` (checked by the fuzz tests)."""
    return [
        diffusers_seed(base, alpha=False, dtype=torch.float32),
        diffusers_seed(base, alpha=True, dtype=torch.float16),
        peft_unprefixed_seed(base),
        legacy_seed(base),
        kohya_seed(base, torch.float32),
        kohya_seed(base, torch.bfloat16),
        loraswap_seed(base),
        loha_seed(base),
        lokr_seed(base),
    ]
