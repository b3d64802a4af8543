"""The one-pass reader (``adapters/views.py``): views of the bytes read, equal to what safetensors reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from adapters import views
from adapters.errors import AdapterInvalid
from adapters.format import Limits
from adapters.views import as_buffer, check_finite_region, file_views, read_file

TENSORS = {
    "a.lora_A.weight": torch.randn(4, 7),
    "a.lora_B.weight": torch.randn(9, 4),
    "b.lora_A.weight": torch.randn(4, 3),
    "b.lora_B.weight": torch.randn(5, 4),
}


def _unaligned(tensors: dict[str, torch.Tensor]) -> bytes:
    """A file whose header is not padded: its data starts at an odd offset."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F16",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (1 - len(text) % 2)  # odd length
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


@pytest.mark.parametrize("layout", ["safetensors", "unaligned"])
def test_views_and_materialise_equal_safetensors(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    half = {k: v.half() for k, v in TENSORS.items()}
    data = safetensors.torch.save(half) if layout == "safetensors" else _unaligned(half)
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    stamped = read_file(path)
    assert stamped is not None and bytes(stamped[0].numpy()) == data
    files, _ = file_views(stamped[0], Limits())
    assert files.region is not None
    monkeypatch.setattr(views, "CHUNK_ELEMENTS", 20)  # several runs, a tensor larger than one
    converted = files.materialise(torch.device("cpu"), torch.float32)
    for name, tensor in half.items():
        assert torch.equal(files.tensors[name], tensor)
        assert converted[name].dtype == torch.float32 and torch.equal(converted[name], tensor.float())
    same = files.materialise(torch.device("cpu"), torch.float16)  # same dtype: views, no copy
    assert all(same[k].data_ptr() == files.tensors[k].data_ptr() for k in half)


def test_mixed_dtypes_are_viewed_one_by_one() -> None:
    mixed = {
        "a.lora_A.weight": TENSORS["a.lora_A.weight"].half(),
        "a.lora_B.weight": TENSORS["a.lora_B.weight"],
    }
    files, _ = file_views(as_buffer(safetensors.torch.save(mixed)), Limits())
    assert files.region is None
    assert all(torch.equal(files.tensors[k], v) for k, v in mixed.items())


def test_a_non_finite_value_is_named() -> None:
    bad = dict(TENSORS)
    bad["b.lora_B.weight"] = bad["b.lora_B.weight"].clone()
    bad["b.lora_B.weight"][2, 1] = float("nan")
    files, _ = file_views(as_buffer(safetensors.torch.save(bad)), Limits())
    with pytest.raises(AdapterInvalid) as err:
        check_finite_region(files)
    assert err.value.reason == "non_finite" and err.value.detail["keys"] == ["b.lora_B.weight"]
    check_finite_region(file_views(as_buffer(safetensors.torch.save(TENSORS)), Limits())[0])


def test_views_of_every_rank_are_contiguous_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Views are ``as_strided`` with row-major strides: 4-D conv factors, 1-D and empty tensors land on
    their own bytes, in the file's buffer and in each converted run."""
    odd = {
        "c.lora_A.weight": torch.randn(4, 3, 3, 3).half(),
        "c.lora_B.weight": torch.randn(6, 4, 1, 1).half(),
        "d.alpha": torch.randn(1).half(),
        "e.empty": torch.randn(0, 5).half(),
        "f.lora_A.weight": torch.randn(2, 11).half(),
    }
    files, _ = file_views(as_buffer(safetensors.torch.save(odd)), Limits())
    monkeypatch.setattr(views, "CHUNK_ELEMENTS", 7)
    converted = files.materialise(torch.device("cpu"), torch.float32)
    for name, tensor in odd.items():
        for got, want in ((files.tensors[name], tensor), (converted[name], tensor.float())):
            assert got.shape == want.shape and got.is_contiguous() and torch.equal(got, want)
