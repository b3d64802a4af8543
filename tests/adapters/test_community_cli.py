"""``loraswap adapters register / inspect / convert / merge`` with Flux and SD3 community files, on
tiny-flux-random and tiny-sd3-random (the architecture and tables from their own configs)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from basemodel.families import get_family
from basemodel.families.lora_tables import CommunityLayout
from basemodel.fingerprint import Architecture
from basemodel.random_models import FLUX_RANDOM_NAME, SD3_RANDOM_NAME, ensure_random_tiny
from service.cli import main
from tests.adapters.community_factory import deltas, kohya_lora
from tests.adapters.conftest import save_bytes


@pytest.fixture(scope="module")
def models(loraswap_home: Path) -> Path:
    for name in (FLUX_RANDOM_NAME, SD3_RANDOM_NAME):
        ensure_random_tiny(loraswap_home / "models", name=name)
    return loraswap_home / "models"


@cache
def base(models: Path, name: str) -> tuple[Architecture, CommunityLayout]:
    arch = BaseIdentity.from_spec(name, models).architecture
    layout = get_family(arch.family).lora_layout(arch.unet_config or {})
    assert layout is not None
    return arch, layout


@pytest.fixture
def cli_env(loraswap_home: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def te_lora(arch: Architecture, prefix: str, component: str, seed: int = 5) -> dict[str, torch.Tensor]:
    """A kohya LoRA on the first layer's q_proj of a text encoder (its shape from the base)."""
    gen = torch.Generator().manual_seed(seed)
    module = next(
        m for m in arch.modules if m.startswith(f"{component}.") and m.endswith("layers.0.self_attn.q_proj")
    )
    out_f, in_f = arch.modules[module]
    name = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
    return {
        f"{name}.lora_down.weight": torch.randn(2, in_f, generator=gen),
        f"{name}.lora_up.weight": torch.randn(out_f, 2, generator=gen),
        f"{name}.alpha": torch.tensor(1.0),
    }


def write(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> Path:
    path.write_bytes(save_bytes(tensors, header))
    return path


def test_flux_kohya_file_through_every_command(
    cli_env: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch, layout = base(models, FLUX_RANDOM_NAME)
    file = write(
        cli_env / "flux-kohya.safetensors",
        kohya_lora(layout.kohya, arch, list(layout.kohya), alpha=4.0)
        | te_lora(arch, "lora_te1_", "text_encoder"),
    )
    spec = FLUX_RANDOM_NAME

    code, out, err = run(capsys, "inspect", str(file), "--base-model", spec)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["source_format"] == "kohya" and shown["components"] == ["text_encoder", "transformer"]
    assert shown["modules"] == sum(len(t) for t in layout.kohya.values()) + 1

    code, out, err = run(capsys, "register", str(file), "--id", "flux-style", "--base-model", spec)
    assert code == 0, err
    record = json.loads(out)
    assert record["source_format"] == "kohya" and record["base_model"]["family"] == "flux"

    # to diffusers (canonical) and to kohya (fused BFL names), each read back to the same ΔW
    diffusers_out, kohya_out = cli_env / "flux-diffusers.safetensors", cli_env / "flux-back.safetensors"
    assert (
        run(
            capsys, "convert", str(file), "--to", "diffusers", "-o", str(diffusers_out), "--base-model", spec
        )[0]
        == 0
    )
    assert (
        run(capsys, "convert", str(file), "--to", "kohya", "-o", str(kohya_out), "--base-model", spec)[0] == 0
    )
    canonical, header = read_adapter(diffusers_out)
    assert (
        header["modelspec.architecture"] == "flux-1-dev/lora" and header["ss_base_model_version"] == "flux1"
    )
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in canonical
    exported, header = read_adapter(kohya_out)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in exported
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in exported
    assert header["modelspec.architecture"] == "flux-1-dev/lora"
    code, out, err = run(capsys, "inspect", str(kohya_out), "--base-model", spec)
    assert code == 0 and json.loads(out)["source_format"] == "kohya", err
    code, out, err = run(
        capsys,
        "convert",
        str(kohya_out),
        "--to",
        "diffusers",
        "-o",
        str(cli_env / "again.safetensors"),
        "--base-model",
        spec,
    )
    assert code == 0, err
    again, _ = read_adapter(cli_env / "again.safetensors")
    first, second = deltas(canonical), deltas(again)
    assert set(first) == set(second)
    for module in first:
        torch.testing.assert_close(second[module], first[module], msg=module)

    # merge into a diffusers folder: the transformer's weights move by exactly ΔW
    target = cli_env / "merged"
    code, _, err = run(
        capsys,
        "merge",
        "flux-style",
        "-o",
        str(target),
        "--dtype",
        "fp32",
        "--no-progress",
        "--base-model",
        spec,
    )
    assert code == 0, err
    module = "single_transformer_blocks.0.proj_mlp"
    with (
        safe_open(str(models / spec / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as before,
        safe_open(str(target / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as after,
    ):
        moved = after.get_tensor(f"{module}.weight") - before.get_tensor(f"{module}.weight")
    torch.testing.assert_close(moved, first[f"transformer.{module}"], rtol=1e-5, atol=1e-6)


def test_xlabs_and_ai_toolkit_report_their_format(
    cli_env: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch, layout = base(models, FLUX_RANDOM_NAME)
    xlabs = kohya_lora(
        layout.xlabs,
        arch,
        list(layout.xlabs),
        alpha=None,
        prefix="",
        dotted=True,
        roles=("down.weight", "up.weight"),
    )
    toolkit = kohya_lora(
        layout.kohya,
        arch,
        ["double_blocks.0.img_attn.qkv"],
        prefix="diffusion_model.",
        dotted=True,
        roles=("lora_A.weight", "lora_B.weight"),
    )
    for name, tensors, expected in (("xlabs", xlabs, "xlabs"), ("toolkit", toolkit, "ai-toolkit")):
        code, out, err = run(
            capsys,
            "inspect",
            str(write(cli_env / f"{name}.safetensors", tensors)),
            "--base-model",
            FLUX_RANDOM_NAME,
        )
        assert code == 0, err
        assert json.loads(out)["source_format"] == expected


@pytest.mark.parametrize(
    ("extra", "header", "expected"),
    [
        (
            {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 32)},
            None,
            "T5",
        ),
        (None, {"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
        ({"lora_unet_double_blocks_5_img_attn_proj.lora_down.weight": torch.zeros(2, 16)}, None, "absent"),
    ],
)
def test_flux_refusals_store_nothing(
    cli_env: Path,
    models: Path,
    capsys: pytest.CaptureFixture[str],
    extra: dict[str, torch.Tensor] | None,
    header: dict[str, str] | None,
    expected: str,
) -> None:
    arch, layout = base(models, FLUX_RANDOM_NAME)
    tensors = kohya_lora(layout.kohya, arch, ["double_blocks.0.img_attn.qkv"]) | (extra or {})
    file = write(cli_env / "bad.safetensors", tensors, header)
    code, _, err = run(capsys, "register", str(file), "--id", "bad", "--base-model", FLUX_RANDOM_NAME)
    assert code == 2 and expected in err, err
    assert "error[adapter_" in err
    code, out, _ = run(capsys, "list", "--json", "--base-model", FLUX_RANDOM_NAME)
    assert code == 0 and json.loads(out) == []


def test_sd3_kohya_file_registers_converts_and_carries_sd3_names(
    cli_env: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch, layout = base(models, SD3_RANDOM_NAME)
    tensors = (
        kohya_lora(layout.kohya, arch, list(layout.kohya))
        | te_lora(arch, "lora_te1_", "text_encoder")
        | te_lora(arch, "lora_te2_", "text_encoder_2", seed=6)
    )
    file = write(cli_env / "sd3-kohya.safetensors", tensors)
    code, out, err = run(capsys, "register", str(file), "--id", "sd3-style", "--base-model", SD3_RANDOM_NAME)
    assert code == 0, err
    record = json.loads(out)
    assert record["source_format"] == "kohya" and record["components"] == [
        "text_encoder",
        "text_encoder_2",
        "transformer",
    ]
    out_file = cli_env / "sd3-back.safetensors"
    code, _, err = run(
        capsys, "convert", str(file), "--to", "kohya", "-o", str(out_file), "--base-model", SD3_RANDOM_NAME
    )
    assert code == 0, err
    exported, header = read_adapter(out_file)
    assert header["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert header["ss_base_model_version"] == "5-medium"
    assert {k.rsplit(".", 2)[0] for k in exported if k.startswith("lora_unet_")} == {
        "lora_unet_" + n.replace(".", "_") for n in layout.kohya
    }
    # the file declares SD3: refused on Flux by family, naming both
    code, _, err = run(
        capsys, "register", str(out_file), "--id", "sd3-on-flux", "--base-model", FLUX_RANDOM_NAME
    )
    assert code == 2 and "error[adapter_incompatible]" in err and "SD3" in err and "Flux" in err
