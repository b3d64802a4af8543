"""LyCORIS adapters (LoHa, LoKr, full diff): reading, canonical form, the registry, convert/inspect,
and the refusals of malformed or mixed files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.delta import module_delta
from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from adapters.kinds import group
from adapters.normalise import normalise
from adapters.registry import Registry
from adapters.sources import open_store
from service.cli import main
from tests.adapters import lycoris_factory as lf
from tests.adapters.conftest import save_bytes


@pytest.fixture(scope="module")
def shapes(base_model: Any) -> dict[str, tuple[int, ...]]:
    return dict(base_model.architecture.modules)


@pytest.fixture(scope="module")
def biased(base_model: Any) -> set[str]:
    components = base_model.lora_components
    out = set()
    for module in lf.TARGETS:
        component, path = module.split(".", 1)
        if components[component].get_submodule(path).bias is not None:
            out.add(module)
    return out


def files(shapes: dict[str, tuple[int, ...]], biased: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "loha": lf.loha_file(shapes),
        "loha-tucker": lf.loha_file(shapes, tucker=True, seed=1),
        "lokr": lf.lokr_file(shapes),
        "full": lf.full_file(shapes, biased),
    }


@pytest.mark.parametrize("name", ["loha", "loha-tucker", "lokr", "full"])
def test_canonical_form_gives_the_reference_delta(
    name: str, shapes: dict[str, tuple[int, ...]], biased: set[str], base_identity: BaseIdentity
) -> None:
    raw = files(shapes, biased)[name]
    canonical, info = normalise(raw, base_identity.architecture, max_rank=256)
    kind = name.split("-")[0]
    assert info.kind == kind and info.source_format == "kohya"
    modules, stray = group(canonical)
    assert not stray and sorted(modules) == sorted(lf.TARGETS)
    assert not any(key.endswith(".alpha") for key in canonical)  # folded into the first factor
    reference = lf.reference_deltas(raw, shapes)
    for module, factors in modules.items():
        want, want_bias = reference[module]
        got = module_delta(kind, factors, shapes[module]).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), module
        if want_bias is not None:
            assert torch.equal(factors["diff_b"].double(), want_bias)
    if kind != "full":
        assert info.ranks[lf.TARGETS[0]] == lf.RANK and info.alphas[lf.TARGETS[0]] == lf.ALPHA


def test_registered_kinds_keep_their_kind(
    registry: Registry, shapes: dict[str, tuple[int, ...]], biased: set[str], tmp_path: Path
) -> None:
    for name, tensors in files(shapes, biased).items():
        version = registry.register(save_bytes(tensors), name)
        kind = name.split("-")[0]
        assert version.kind == kind and version.source_format == "kohya"
        assert version.num_modules == len(lf.TARGETS)
        loaded = registry.open(name)
        assert loaded.metadata.kind == kind
        assert not any(".lora_A." in key for key in loaded.tensors)  # never converted into a LoRA
        record = json.loads(registry.store.get(f"adapters/{name}/versions/1.json"))
        assert record["kind"] == kind
    # Registering the same content again dedups; a stored (canonical) file registers as the same kind.
    assert registry.register(save_bytes(files(shapes, biased)["loha"]), "loha").version == 1
    stored = registry.read_blob(registry.resolve("lokr"))
    copy = registry.register(stored, "lokr-copy")
    original, again = registry.open("lokr").tensors, registry.open(copy).tensors
    assert copy.kind == "lokr" and original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_lora_records_are_unchanged(registry: Registry, lora_case: Any) -> None:
    from tests.adapters.factory import diffusers_layout

    registry.register(save_bytes(diffusers_layout(lora_case)), "plain")
    record = json.loads(registry.store.get("adapters/plain/versions/1.json"))
    assert "kind" not in record and registry.resolve("plain").kind == "lora"


def _broken(
    shapes: dict[str, tuple[int, ...]], biased: set[str]
) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    loha = lf.loha_file(shapes, targets=lf.TARGETS[:2])
    lokr = lf.lokr_file(shapes, targets=lf.TARGETS[:2])
    name = lf.kohya_name(lf.TARGETS[0])
    lora = {f"{name}.lora_down.weight": torch.zeros(2, 64), f"{name}.lora_up.weight": torch.zeros(64, 2)}
    other = lf.kohya_name(lf.TARGETS[1])
    return {
        "missing factor": (
            {k: v for k, v in loha.items() if not k.endswith(f"{name}.hada_w2_b")},
            "incomplete_pair",
        ),
        "wrong shape": ({**loha, f"{name}.hada_w1_b": torch.zeros(lf.RANK, 65)}, "shape_mismatch"),
        "tucker on a linear": (
            {**loha, f"{name}.hada_t1": torch.zeros(4, 4, 3, 3), f"{name}.hada_t2": torch.zeros(4, 4, 3, 3)},
            "shape_mismatch",
        ),
        "half a tucker": ({**loha, f"{name}.hada_t1": torch.zeros(4, 4, 3, 3)}, "incomplete_pair"),
        "both lokr halves": ({**lokr, f"{name}.lokr_w1_a": torch.zeros(8, 4)}, "incomplete_pair"),
        "lokr product off": ({**lokr, f"{name}.lokr_w1": torch.zeros(3, 8)}, "shape_mismatch"),
        "loha beside lora": (
            {**{k: v for k, v in loha.items() if name not in k}, **lora},
            "mixed_adapter_kinds",
        ),
        "loha beside lokr": (
            {**{k: v for k, v in loha.items() if other in k}, **{k: v for k, v in lokr.items() if name in k}},
            "mixed_adapter_kinds",
        ),
        "nan": ({**loha, f"{name}.hada_w1_a": torch.full((64, lf.RANK), float("nan"))}, "non_finite"),
        "alpha out of range": ({**loha, f"{name}.alpha": torch.tensor(1e9)}, "bad_alpha"),
        "alpha not scalar": ({**loha, f"{name}.alpha": torch.ones(2)}, "bad_alpha"),
        "rank over the limit": (loha, "rank_too_large"),
        "unknown module": ({"lora_unet_nowhere.hada_w1_a": torch.zeros(2, 2), **loha}, "modules_absent"),
        "unknown role": ({**loha, f"{name}.hada_w3_a": torch.zeros(2, 2)}, "unknown_layout"),
        "alpha alone": (
            {**loha, f"{lf.kohya_name(lf.TARGETS[5])}.alpha": torch.tensor(1.0)},
            "incomplete_pair",
        ),
        "dora": ({**loha, f"{name}.dora_scale": torch.ones(64, 1)}, "unsupported_adapter_type"),
        "full diff wrong shape": ({f"{name}.diff": torch.zeros(64, 63)}, "shape_mismatch"),
        "diff_b wrong shape": (
            {f"{name}.diff": torch.zeros(64, 64), f"{name}.diff_b": torch.zeros(3)},
            "shape_mismatch",
        ),
        "lycoris for sdxl's second encoder": (
            {**loha, "lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(2, 2)},
            "family_mismatch",
        ),
    }


CASES = [
    "missing factor", "wrong shape", "tucker on a linear", "half a tucker", "both lokr halves",
    "lokr product off", "loha beside lora", "loha beside lokr", "nan", "alpha out of range",
    "alpha not scalar", "rank over the limit", "unknown module", "unknown role", "alpha alone", "dora",
    "full diff wrong shape", "diff_b wrong shape", "lycoris for sdxl's second encoder",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_malformed_lycoris_files_are_refused_and_nothing_is_stored(
    case: str,
    tmp_path: Path,
    base_identity: BaseIdentity,
    shapes: dict[str, tuple[int, ...]],
    biased: set[str],
) -> None:
    tensors, reason = _broken(shapes, biased)[case]
    store = open_store(str(tmp_path / "store"))
    registry = Registry(store, base_identity, max_rank=3 if case == "rank over the limit" else 256)
    with pytest.raises((AdapterInvalid, AdapterIncompatible)) as caught:
        registry.register(save_bytes(tensors), "bad")
    assert caught.value.reason == reason, caught.value.message
    assert caught.value.type in ("adapter_invalid", "adapter_incompatible")
    assert store.list("adapters/") == [] and store.list("blobs/") == []


@pytest.fixture
def cli_env(loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")
    return tmp_path


def test_inspect_and_convert(
    cli_env: Path,
    shapes: dict[str, tuple[int, ...]],
    biased: set[str],
    base_identity: BaseIdentity,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = cli_env / "hada.safetensors"
    raw = lf.loha_file(shapes)
    source.write_bytes(save_bytes(raw))
    assert main(["adapters", "inspect", str(source)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "loha" and shown["modules"] == len(lf.TARGETS) and shown["rank"] == lf.RANK
    assert shown["components"] == ["text_encoder", "unet"] and shown["alpha"] == lf.ALPHA

    # --to kohya: LyCORIS names again, scale folded (alpha = rank), the same ΔW.
    out = cli_env / "kohya.safetensors"
    assert main(["adapters", "convert", str(source), "--to", "kohya", "-o", str(out)]) == 0
    assert "loha" in capsys.readouterr().out
    exported, _ = read_adapter(out)
    name = lf.kohya_name(lf.TARGETS[0])
    assert float(exported[f"{name}.alpha"]) == lf.RANK and f"{name}.hada_t1" not in exported
    again, info = normalise(exported, base_identity.architecture)
    first, _ = normalise(raw, base_identity.architecture)
    assert info.kind == "loha" and all(torch.allclose(again[k], first[k]) for k in first)

    # --to diffusers: diffusers has no LoHa layout; refused, nothing written.
    refused = cli_env / "diffusers.safetensors"
    assert main(["adapters", "convert", str(source), "--to", "diffusers", "-o", str(refused)]) != 0
    assert "no diffusers (PEFT LoRA) layout" in capsys.readouterr().err and not refused.exists()
