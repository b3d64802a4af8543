"""Every rejection: a typed error naming the problem, and nothing stored."""

from __future__ import annotations

import json
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapters.errors import (
    AdapterIncompatible,
    AdapterInvalid,
    AdapterTooLarge,
    AdapterUnsafeFormat,
    InvalidAdapterRef,
)
from adapters.format import Limits, read_adapter
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, BaseModelInfo
from adapters.normalise import normalise
from adapters.refs import parse_ref, validate_id
from adapters.registry import Registry
from adapters.sources import LocalStore
from basemodel.errors import Incompatible, NotFound, TooLarge, UnsafeFormat, ValidationFailed
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import LoraCase, diffusers_layout, kohya_layout

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


class _Touch:
    """Unpickling this creates a marker file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def _kohya(case: LoraCase) -> dict[str, torch.Tensor]:
    return kohya_layout(case)


def _pair(rank: int = 4, in_f: int = 64, out_f: int = 64) -> dict[str, torch.Tensor]:
    return {f"{Q}.lora_A.weight": torch.randn(rank, in_f), f"{Q}.lora_B.weight": torch.randn(out_f, rank)}


def _safetensors_file(case: LoraCase) -> bytes:
    return save_bytes(_kohya(case))


def _bad_header_len(limit: int) -> bytes:
    """A header over ``limit`` that is really there (a length past the file is 'truncated', issue 20)."""
    return (limit + 1).to_bytes(8, "little") + b"{" + b" " * (limit - 1) + b"}"


def _offsets_lie() -> bytes:
    header = json.dumps(
        {"x.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}
    ).encode()
    return len(header).to_bytes(8, "little") + header + bytes(32)


def _dtype_list() -> bytes:
    header = json.dumps({"x.lora_A.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}})
    return len(header).to_bytes(8, "little") + header.encode() + bytes(4)


CASES: dict[str, tuple[Callable[[LoraCase], bytes], type[Exception], str]] = {
    "pickle": (lambda c: pickle.dumps({"w": 1}), AdapterUnsafeFormat, "pickle"),
    "torch-zip": (lambda c: b"PK\x03\x04" + bytes(64), AdapterUnsafeFormat, "pickle"),
    "empty-file": (lambda c: b"", AdapterInvalid, "truncated"),
    "truncated": (lambda c: _safetensors_file(c)[:-100], AdapterInvalid, "truncated"),
    "header-cut": (lambda c: _safetensors_file(c)[:200], AdapterInvalid, "truncated"),
    "header-too-large": (lambda c: _bad_header_len(1 << 20), AdapterTooLarge, "header_too_large"),
    "header-not-json": (
        lambda c: (9).to_bytes(8, "little") + b"{not json",
        AdapterInvalid,
        "malformed_header",
    ),
    "header-not-object": (lambda c: (2).to_bytes(8, "little") + b"[]", AdapterInvalid, "malformed_header"),
    "offsets-lie": (lambda c: _offsets_lie(), AdapterInvalid, "malformed_header"),
    "dtype-not-a-string": (lambda c: _dtype_list(), AdapterInvalid, "unsupported_dtype"),
    "header-too-deep": (
        lambda c: (200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000,
        AdapterInvalid,
        "json_too_deep",
    ),
    "no-tensors": (lambda c: save_bytes({}), AdapterInvalid, "empty"),
    "unknown-layout": (
        lambda c: save_bytes({"model.diffusion_model.w": torch.zeros(2)}),
        AdapterInvalid,
        "unknown_layout",
    ),
    "ldm-kohya-shape-mismatch": (  # LDM names are read (issue 11); this pair does not fit proj_in [64, 64]
        lambda c: save_bytes(
            {
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4),
            }
        ),
        AdapterIncompatible,
        "shape_mismatch",
    ),
    "ldm-kohya-absent": (
        lambda c: save_bytes(
            {
                "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(4, 64),
                "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(64, 4),
            }
        ),
        AdapterIncompatible,
        "modules_absent",
    ),
    "oft": (  # LoHa / LoKr / full diffs are read now (tests/adapters/test_lycoris.py); OFT still is not
        lambda c: save_bytes({"lora_unet_x.oft_blocks": torch.zeros(2, 2)}),
        AdapterInvalid,
        "unsupported_adapter_type",
    ),
    "loha-unknown-module": (
        lambda c: save_bytes({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}),
        AdapterIncompatible,
        "modules_absent",
    ),
    "modules-absent": (
        lambda c: save_bytes(
            {
                **_kohya(c),
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            }
        ),
        AdapterIncompatible,
        "modules_absent",
    ),
    "sdxl-text-encoder-2": (
        lambda c: save_bytes(
            {
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
            }
        ),
        AdapterIncompatible,
        "family_mismatch",  # text_encoder_2 is SDXL's: the message names SDXL and the base's family
    ),
    "shape-mismatch": (lambda c: save_bytes(_pair(in_f=48)), AdapterIncompatible, "shape_mismatch"),
    "rank-inconsistent": (
        lambda c: save_bytes(
            {f"{Q}.lora_A.weight": torch.zeros(4, 64), f"{Q}.lora_B.weight": torch.zeros(64, 3)}
        ),
        AdapterIncompatible,
        "shape_mismatch",
    ),
    "rank-over-max": (lambda c: save_bytes(_pair(rank=64)), AdapterInvalid, "rank_too_large"),
    "nan": (
        lambda c: save_bytes({**_pair(), f"{Q}.lora_B.weight": torch.full((64, 4), float("nan"))}),
        AdapterInvalid,
        "non_finite",
    ),
    "inf-alpha": (
        lambda c: save_bytes(
            {**_kohya(c), next(k for k in _kohya(c) if k.endswith(".alpha")): torch.tensor(float("inf"))}
        ),
        AdapterInvalid,
        "non_finite",
    ),
    "float64": (
        lambda c: save_bytes({k: v.double() for k, v in _pair().items()}),
        AdapterInvalid,
        "unsupported_dtype",
    ),
    "int8": (
        lambda c: save_bytes({k: v.to(torch.int8) for k, v in _pair().items()}),
        AdapterInvalid,
        "unsupported_dtype",
    ),
    "missing-up": (
        lambda c: save_bytes({f"{Q}.lora_A.weight": torch.zeros(4, 64)}),
        AdapterInvalid,
        "incomplete_pair",
    ),
    "mixed-layouts": (lambda c: save_bytes({**_pair(), **_kohya(c)}), AdapterInvalid, "unknown_layout"),
    "metadata-not-json": (
        lambda c: save_bytes(_pair(), {"loraswap": "{oops"}),
        AdapterInvalid,
        "bad_metadata",
    ),
    "metadata-unknown-field": (
        lambda c: save_bytes(_pair(), {"loraswap": json.dumps({"schema_version": 1, "colour": "red"})}),
        AdapterInvalid,
        "bad_metadata",
    ),
    "metadata-future-schema": (
        lambda c: save_bytes(_pair(), {"loraswap": json.dumps({"schema_version": 2})}),
        AdapterInvalid,
        "bad_metadata",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_rejected_with_a_typed_error_and_nothing_is_stored(
    name: str, lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    build, error, reason = CASES[name]
    store = LocalStore(tmp_path / "store")
    registry = Registry(store, base_identity, max_rank=16)
    with pytest.raises(error) as err:
        registry.register(build(lora_case), "victim")
    assert err.value.detail.get("reason") == reason, err.value.message
    assert err.value.message
    assert store.list() == []


def test_pickle_is_refused_without_being_unpickled(tmp_path: Path, base_identity: BaseIdentity) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Touch(marker))
    registry = Registry(LocalStore(tmp_path / "store"), base_identity)
    for name in ("evil.pt", "evil.ckpt", "evil.bin", "evil.safetensors"):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(AdapterUnsafeFormat) as err:
            registry.register(path, "evil")
        assert isinstance(err.value, UnsafeFormat)
    with pytest.raises(AdapterUnsafeFormat):
        read_adapter(payload)
    assert not marker.exists()


def test_file_over_the_size_limit_is_refused_before_reading(lora_case: LoraCase, tmp_path: Path) -> None:
    data = _safetensors_file(lora_case)
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)
    small = Limits(max_bytes=len(data) - 1)
    for source in (path, data):
        with pytest.raises(AdapterTooLarge) as err:
            read_adapter(source, limits=small)
        assert err.value.reason == "file_too_large"
        assert isinstance(err.value, TooLarge)
    assert read_adapter(data, limits=Limits(max_bytes=len(data)))[0]


def test_header_limit_is_configurable(lora_case: LoraCase) -> None:
    data = _safetensors_file(lora_case)
    header_len = int.from_bytes(data[:8], "little")
    with pytest.raises(AdapterTooLarge) as err:
        read_adapter(data, limits=Limits(max_header_bytes=header_len - 1))
    assert err.value.reason == "header_too_large"


def test_modules_absent_error_lists_the_first_few(lora_case: LoraCase, base_identity: BaseIdentity) -> None:
    tensors = {
        f"lora_unet_down_blocks_9_resnets_{i}_conv1.lora_{d}.weight": torch.zeros(2, 2)
        for i in range(8)
        for d in ("down", "up")
    }
    with pytest.raises(AdapterIncompatible) as err:
        normalise(tensors, base_identity.architecture)
    assert err.value.detail["count"] == 8
    assert len(err.value.detail["modules"]) == 5
    assert "unet.down_blocks_9_resnets_0_conv1" in err.value.message


def test_error_classes_keep_the_shared_bases_for_http_mapping() -> None:
    from adapters.errors import AdapterNotFound

    assert issubclass(AdapterInvalid, ValidationFailed) and AdapterInvalid.type == "adapter_invalid"
    assert (
        issubclass(AdapterIncompatible, Incompatible) and AdapterIncompatible.type == "adapter_incompatible"
    )
    assert issubclass(AdapterNotFound, NotFound) and AdapterNotFound.type == "adapter_not_found"
    assert issubclass(AdapterTooLarge, TooLarge) and AdapterTooLarge.type == "adapter_too_large"
    body = AdapterInvalid("bad", reason="x", detail={"keys": ["k"]}).to_dict()
    assert body["type"] == "adapter_invalid" and body["detail"] == {"keys": ["k"], "reason": "x"}


# -- base-model compatibility --------------------------------------------------------------------


def _with_embedded(case: LoraCase, base: BaseModelInfo) -> bytes:
    meta = AdapterMetadata(base_model=base)
    return save_bytes(diffusers_layout(case), {"loraswap": meta.to_json()})


def test_architecture_mismatch_is_always_refused(
    lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    other = BaseModelInfo(name="sdxl", fingerprint="0" * 64, architecture_id="f" * 64, family="sdxl")
    store = LocalStore(tmp_path / "s")
    with pytest.raises(AdapterIncompatible) as err:
        Registry(store, base_identity).register(_with_embedded(lora_case, other), "a")
    assert err.value.reason == "architecture_mismatch"
    assert store.list() == []


def test_other_checkpoint_of_same_architecture_is_recorded_or_refused_in_strict_mode(
    lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    same_arch = base_identity.info().model_copy(update={"name": "finetune", "fingerprint": "1" * 64})
    other_file = _with_embedded(lora_case, same_arch)
    exact_file = _with_embedded(lora_case, base_identity.info())
    kohya_exact = save_bytes(kohya_layout(lora_case), {"ss_new_sd_model_hash": base_identity.fingerprint})
    anonymous = save_bytes(kohya_layout(lora_case))
    registry = Registry(LocalStore(tmp_path / "s"), base_identity)
    assert registry.register(other_file, "a").base_model_match is False
    assert registry.register(exact_file, "b").base_model_match is True
    assert registry.register(kohya_exact, "c").base_model_match is True
    assert registry.register(anonymous, "d").base_model_match is None

    strict = Registry(LocalStore(tmp_path / "strict"), base_identity, strict_base=True)
    for data, reason in ((other_file, "base_mismatch"), (anonymous, "base_unknown")):
        with pytest.raises(AdapterIncompatible) as err:
            strict.register(data, "x")
        assert err.value.reason == reason
    assert strict.register(exact_file, "x").version == 1
    with pytest.raises(AdapterIncompatible):
        registry.register(other_file, "e", strict_base=True)  # per-call override


def test_opening_refuses_another_architecture(
    lora_case: LoraCase, base_identity: BaseIdentity, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "s")
    version = Registry(store, base_identity).register(save_bytes(kohya_layout(lora_case)), "a")
    other = BaseIdentity("other", "2" * 64, type(base_identity.architecture)(modules={"unet.x": (4, 4)}))
    with pytest.raises(AdapterIncompatible) as err:
        Registry(store, other).open(version)
    assert err.value.reason == "architecture_mismatch"
    same_arch_other_ckpt = BaseIdentity("ft", "3" * 64, base_identity.architecture)
    assert Registry(store, same_arch_other_ckpt).open(version).tensors
    with pytest.raises(AdapterIncompatible):
        Registry(store, same_arch_other_ckpt, strict_base=True).open(version)


# -- ids and references ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "..", ".", "a/b", "A", "-x", "_x", ".hidden", "a..b", "x" * 65, "a b", "é", "a\x00", "a@b"]
)
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        validate_id(bad)


@pytest.mark.parametrize(
    "bad", ["x@0", "x@-1", "x@01", "x@abc", "x@", "x@1.0", "x@latest@1", "../x@1", "x@１"]
)
def test_invalid_refs_are_refused(bad: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        parse_ref(bad)


def test_valid_ids_and_refs() -> None:
    assert validate_id("a") == "a" and validate_id("x" * 64)
    assert validate_id("my-style.v2_final") == "my-style.v2_final"
    assert (parse_ref("a").version, parse_ref("a").explicit) == (None, False)
    assert (parse_ref("a@latest").version, parse_ref("a@latest").explicit) == (None, True)
    assert parse_ref("a@12").version == 12
