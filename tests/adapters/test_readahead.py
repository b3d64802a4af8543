"""The cold load's overlapped read (``adapters/readahead.py`` + ``Registry.open_file``): the same result
and the same findings as reading first, with a hash mismatch reported before any other finding."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adapters import opening
from adapters.errors import AdapterCorrupt, AdapterIncompatible, AdapterInvalid
from adapters.identity import BaseIdentity
from adapters.readahead import ReadAhead
from adapters.records import blob_key
from adapters.registry import Registry
from adapters.sources import LocalStore
from adapters.validate import check_lora_shapes
from adapters.views import as_buffer, file_views
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import LoraCase, kohya_layout
from tests.adapters.test_views import TENSORS, _unaligned


@pytest.fixture
def reader() -> Any:
    ahead = ReadAhead()
    yield ahead
    ahead.shutdown()


@pytest.fixture
def stored(tmp_path: Path, base_identity: BaseIdentity, lora_case: LoraCase) -> tuple[Registry, Any, Path]:
    """A kohya file registered in a local store, and the path of its stored file."""
    store = LocalStore(tmp_path / "store")
    registry = Registry(store, base_identity, max_rank=64)
    version = registry.register(save_bytes(kohya_layout(lora_case), {"ss_steps": "7"}), "ahead")
    path = store.local_path(blob_key(version.sha256))
    assert path is not None
    return registry, version, path


def _open(reader: ReadAhead, registry: Registry, version: Any, path: Path, **kw: Any) -> Any:
    opened = reader.open(path)
    assert opened is not None
    return registry.open_file(version, opened, **kw)


@pytest.mark.parametrize("verify", [True, False])
def test_an_overlapped_open_equals_opening_the_bytes(
    stored: tuple[Registry, Any, Path], reader: ReadAhead, verify: bool
) -> None:
    registry, version, path = stored
    loaded = _open(reader, registry, version, path, verify=verify)
    expected = registry.open_data(version, path.read_bytes())
    assert loaded.tensors.keys() == expected.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) for k, t in expected.tensors.items())
    assert loaded.metadata == expected.metadata


def test_a_corrupt_file_is_corrupt_before_anything_else(
    stored: tuple[Registry, Any, Path], reader: ReadAhead
) -> None:
    """Bytes that fail their hash AND whose header is broken: the hash is the finding (the cache
    removes a corrupt disk copy and fetches it again; a header error would not)."""
    registry, version, path = stored
    data = bytearray(path.read_bytes())
    data[8:10] = b"[]"  # the header no longer parses as an object
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterInvalid):
        registry.open_data(version, bytes(data), verify=False)  # a header finding on its own
    with pytest.raises(AdapterCorrupt, match="blake3"):
        _open(reader, registry, version, path)


def test_a_file_that_shrinks_after_it_is_opened_is_corrupt(
    stored: tuple[Registry, Any, Path], reader: ReadAhead
) -> None:
    registry, version, path = stored
    opened = reader.open(path)
    assert opened is not None
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(AdapterCorrupt) as err:
        registry.open_file(version, opened, verify=False)  # even a file "verified before" is refused
    assert err.value.reason == "short_read"


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_non_finite_value_is_named_unless_these_bytes_were_checked_before(
    stored: tuple[Registry, Any, Path], reader: ReadAhead, where: str, verify: bool
) -> None:
    """A NaN anywhere is a 422 naming its tensor, on a first read and on a read whose hash is skipped;
    only ``values=False`` (bytes this process verified and checked before) skips the value check."""
    registry, version, path = stored
    data = bytearray(path.read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    header.pop("__metadata__", None)
    name, entry = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])[
        0 if where == "first" else -1
    ]
    nan = {"F16": b"\x00\x7e", "F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f"}[entry["dtype"]]
    at = 8 + int.from_bytes(data[:8], "little") + entry["data_offsets"][0]
    data[at : at + len(nan)] = nan
    path.write_bytes(bytes(data))
    failure = AdapterCorrupt if verify else AdapterInvalid  # the hash comes first
    with pytest.raises(failure) as err:
        _open(reader, registry, version, path, verify=verify)
    if not verify:
        assert name.rsplit(".", 1)[0] in err.value.message
    with pytest.raises(failure):  # the header memo changes nothing about the values
        _open(reader, registry, version, path, verify=verify)
    assert _open(reader, registry, version, path, verify=False, values=False).tensors  # trusted


def test_an_unaligned_file_waits_for_its_bytes(tmp_path: Path, reader: ReadAhead) -> None:
    """Views of data at an odd offset are copied: that copy waits for the read."""
    half = {k: v.half() for k, v in TENSORS.items()}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_unaligned(half))
    opened = reader.open(path)
    assert opened is not None
    opened.read_head(max_header_bytes=1 << 20)
    opened.hand_over(None)
    waited: list[bool] = []

    def ready() -> None:
        opened.wait_read()
        waited.append(True)

    files, _ = file_views(opened.buffer, opening.Limits(max_bytes=opened.buffer.numel()), ready=ready)
    opened.finish()
    assert waited and all(torch.equal(files.tensors[k], t) for k, t in half.items())


@pytest.mark.parametrize("header", [b"\xff" * 8, (10 << 20).to_bytes(8, "little"), b"\x04"])
def test_a_header_length_past_the_limit_or_the_file_is_read_whole(
    tmp_path: Path, reader: ReadAhead, header: bytes
) -> None:
    """A length the header checks will refuse is not trusted for the split: the file is read here."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header + b"{}" * 5)
    opened = reader.open(path)
    assert opened is not None
    opened.read_head(max_header_bytes=1 << 20)
    opened.hand_over(None)
    opened.finish()
    assert bytes(opened.buffer.numpy()) == path.read_bytes()


def test_no_file_is_left_open(tmp_path: Path, reader: ReadAhead) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors.torch.save({k: v.half() for k, v in TENSORS.items()}))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        started = reader.open(path)
        assert started is not None
        started.read_head(max_header_bytes=1 << 20)
        started.hand_over(None)
        started.finish()
        discarded = reader.open(path)
        assert discarded is not None
        discarded.discard()
        given_up = reader.open(path)  # the header read, then an error before the hand-over
        assert given_up is not None
        given_up.read_head(max_header_bytes=1 << 20)
        given_up.finish()
    assert len(os.listdir("/proc/self/fd")) == before
    assert reader.open(tmp_path / "missing") is None
    assert bytes(as_buffer(path.read_bytes()).numpy()) == bytes(started.buffer.numpy())


def test_a_plain_lora_s_structure_is_checked_without_reading_a_value(
    stored: tuple[Registry, Any, Path], base_identity: BaseIdentity
) -> None:
    """``check_lora_shapes`` runs while the bytes are still arriving: on meta tensors (which have no
    values to read: any read raises) it checks a plain LoRA whole, and still refuses a wrong shape."""
    registry, version, _ = stored
    loaded = registry.open(version)
    meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in loaded.tensors.items()}
    assert check_lora_shapes(meta, base_identity.architecture)
    name = next(k for k in meta if k.endswith("lora_B.weight"))
    wrong = dict(meta, **{name: torch.empty(meta[name].shape[0] + 1, meta[name].shape[1], device="meta")})
    with pytest.raises(AdapterIncompatible, match="shapes"):
        check_lora_shapes(wrong, base_identity.architecture)
    lycoris = {k.replace("lora_A.weight", "hada_w1_a"): t for k, t in meta.items()}
    assert not check_lora_shapes(lycoris, base_identity.architecture)  # other kinds: not checked here


def test_a_header_that_passed_is_not_parsed_again_and_a_changed_one_is(
    stored: tuple[Registry, Any, Path], reader: ReadAhead, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header memo: the same header bytes skip the parse and the structure checks; different bytes
    under the same content id (a file changed behind a matching stamp) are parsed and checked again."""
    registry, version, path = stored
    parsed: list[int] = []
    parse = opening.parse_layout

    def counting(*args: Any) -> Any:
        parsed.append(1)
        return parse(*args)

    monkeypatch.setattr(opening, "parse_layout", counting)
    first = _open(reader, registry, version, path, verify=False)
    again = _open(reader, registry, version, path, verify=False)
    assert len(parsed) == 1
    assert all(torch.equal(first.tensors[k], t) for k, t in again.tensors.items())
    assert again.metadata == first.metadata and again.metadata is not first.metadata

    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(k for k, e in header.items() if k != "__metadata__" and len(e["shape"]) == 2)
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [cols, rows]  # same bytes, transposed: a shape the base refuses
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(text) == length
    path.write_bytes(data[:8] + text + data[8 + length :])
    with pytest.raises(AdapterIncompatible, match="shapes"):
        _open(reader, registry, version, path, verify=False)
    assert len(parsed) == 2


def test_the_header_memo_keeps_what_its_budget_allows(tmp_path: Path) -> None:
    """Bounded by an estimate of its memory: the least recently used headers go first; ``forget``
    gives their bytes back; a header over the whole budget is not kept."""
    from adapters.views import parse_layout

    half = {k: v.half() for k, v in TENSORS.items()}
    data = safetensors.torch.save(half)
    head = data[: 8 + int.from_bytes(data[:8], "little")]
    layout = parse_layout(head, len(data), opening.Limits(max_bytes=len(data)))
    known = opening.Checked(layout, opening.AdapterMetadata(), True)
    checks = opening.OpenChecks(None, False, 1 << 20)
    cost = len(head) + 750 * len(layout.entries)
    memo = opening.HeaderMemo(max_bytes=2 * cost)
    for sha in "abc":
        memo.put(sha, known, checks)
    assert memo.nbytes == 2 * cost
    assert memo.get("a", head, len(data), checks) is None  # the oldest went
    assert memo.get("c", head, len(data), checks) and memo.get("b", head, len(data), checks) is known
    memo.put("d", known, checks)  # "b" was used after "c": "c" goes
    assert memo.get("c", head, len(data), checks) is None and memo.get("b", head, len(data), checks)
    memo.forget("b")
    assert memo.nbytes == cost
    assert memo.get("d", head, len(data), opening.OpenChecks(None, False, 1)) is None  # other limits
    tiny = opening.HeaderMemo(max_bytes=cost - 1)
    tiny.put("a", known, checks)
    assert tiny.nbytes == 0 and tiny.get("a", head, len(data), checks) is None
