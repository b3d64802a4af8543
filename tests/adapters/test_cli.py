"""``loraswap adapters …`` through the root command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.format import read_adapter
from service.cli import main
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import LoraCase, kohya_layout


@pytest.fixture
def cli_env(loraswap_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"file://{tmp_path / 'store'}")
    return tmp_path


@pytest.fixture
def kohya_file(lora_case: LoraCase, tmp_path: Path) -> Path:
    path = tmp_path / "style.safetensors"
    path.write_bytes(save_bytes(kohya_layout(lora_case)))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["adapters", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_register_list_show_delete(
    cli_env: Path, kohya_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = json.dumps({"trigger_words": ["sks"], "inference": {"prompts": ["a sks cat"]}})
    code, out, _ = run(
        capsys, "register", str(kohya_file), "--id", "style", "--scale-default", "0.8", "--metadata", meta
    )
    assert code == 0
    registered = json.loads(out)
    assert registered["ref"] == "style@1" and registered["scale_default"] == 0.8
    assert registered["source_format"] == "kohya" and registered["base_model"]["name"] == "tiny-sd"

    code, out, _ = run(capsys, "list")
    assert code == 0 and out.splitlines()[1].split()[:4] == ["style", "1", "1", "0"]
    code, out, _ = run(capsys, "list", "--json")
    assert json.loads(out)[0]["latest"]["ref"] == "style@1"

    code, out, _ = run(capsys, "show", "style@1", "--versions")
    shown = json.loads(out)
    assert code == 0 and shown["metadata"]["trigger_words"] == ["sks"]
    assert shown["metadata"]["inference"]["prompts"] == ["a sks cat"]
    assert shown["compatible"]["ok"] is True and shown["compatible"]["same_checkpoint"] is True
    assert [v["ref"] for v in shown["versions"]] == ["style@1"]

    code, out, _ = run(capsys, "delete", "style@1")
    assert code == 0 and out.strip() == "deleted style@1"
    code, _, err = run(capsys, "show", "style")
    assert code == 2 and "error[adapter_not_found]" in err


def test_user_errors_exit_2_with_the_error_type(
    cli_env: Path, kohya_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "register", str(kohya_file), "--id", "../etc")
    assert code == 2 and "error[adapter_ref_invalid]" in err
    pickle_file = cli_env / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04junk")
    code, _, err = run(capsys, "register", str(pickle_file), "--id", "p")
    assert code == 2 and "error[adapter_unsafe_format]" in err
    code, _, err = run(capsys, "register", str(kohya_file), "--id", "x", "--metadata", '{"colour": 1}')
    assert code == 2 and "error[adapter_invalid]" in err and "colour" in err
    code, _, err = run(capsys, "list", "--store", "ftp://nope")
    assert code == 2 and "error[config_error]" in err
    code, _, err = run(capsys, "register", str(kohya_file), "--id", "s", "--strict-base")
    assert code == 2 and "error[adapter_incompatible]" in err


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_convert(
    layout: str, cli_env: Path, kohya_file: Path, capsys: pytest.CaptureFixture[str], lora_case: LoraCase
) -> None:
    out_path = cli_env / f"out-{layout}.safetensors"
    code, out, _ = run(capsys, "convert", str(kohya_file), "--to", layout, "-o", str(out_path))
    assert code == 0 and "wrote" in out
    tensors, header = read_adapter(out_path)
    prefix = ("unet.", "text_encoder.") if layout == "diffusers" else ("lora_unet_", "lora_te_")
    assert all(k.startswith(prefix) for k in tensors)
    assert json.loads(header["loraswap"])["source_format"] == "kohya"
    code, out, _ = run(capsys, "register", str(out_path), "--id", f"conv-{layout}")
    assert code == 0 and json.loads(out)["source_format"] == "kohya"


def test_s3_store_from_the_environment(
    loraswap_home: Path,
    moto_endpoint: str,
    s3_bucket: str,
    kohya_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """LORASWAP_STORE=s3://… with boto3's own AWS_ENDPOINT_URL; --s3-endpoint-url overrides it."""
    monkeypatch.setenv("LORASWAP_HOME", str(loraswap_home))
    monkeypatch.setenv("LORASWAP_STORE", f"s3://{s3_bucket}/shared")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    code, out, _ = run(capsys, "register", str(kohya_file), "--id", "remote")
    assert code == 0 and json.loads(out)["ref"] == "remote@1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # wrong: the flag must win
    code, out, _ = run(capsys, "list", "--json", "--s3-endpoint-url", moto_endpoint)
    assert code == 0 and [s["adapter_id"] for s in json.loads(out)] == ["remote"]


def test_register_with_pictures(
    cli_env: Path, kohya_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from PIL import Image

    Image.new("RGB", (20, 10), "white").save(tmp_path / "curve.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "cover.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    code, out, _ = run(
        capsys, "register", str(kohya_file), "--id", "pics",
        "--picture", str(tmp_path / "cover.jpg"), "--loss-curve", str(tmp_path / "curve.png"),
    )  # fmt: skip
    assert code == 0
    pictures = json.loads(out)["pictures"]
    assert [(p["role"], p["name"], p["media_type"]) for p in pictures] == [
        ("preview", "cover.jpg", "image/jpeg"),
        ("loss_curve", "curve.png", "image/png"),
    ]
    code, _, err = run(
        capsys, "register", str(kohya_file), "--id", "pics", "--samples", str(tmp_path / "notes.png")
    )
    assert code == 2 and "error[image_invalid]" in err


def test_inspect_reports_the_file_as_it_is(
    cli_env: Path, kohya_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A converted file is inspected as what it now is: its own key layout and tensor count (a kohya export
    once read ``"source_format": "loraswap"``, ``"tensors": 112`` for 168 tensors), the origin its metadata
    records beside it, and the same output every time."""
    diffusers, kohya = cli_env / "d.safetensors", cli_env / "k.safetensors"
    assert run(capsys, "convert", str(kohya_file), "--to", "diffusers", "-o", str(diffusers))[0] == 0
    assert run(capsys, "convert", str(diffusers), "--to", "kohya", "-o", str(kohya))[0] == 0
    for path, layout in ((kohya_file, "kohya"), (diffusers, "diffusers"), (kohya, "kohya")):
        code, out, _ = run(capsys, "inspect", str(path))
        shown = json.loads(out)
        assert code == 0 and shown["source_format"] == layout, path.name
        assert shown["tensors"] == len(read_adapter(path)[0]), path.name
        assert run(capsys, "inspect", str(path))[1] == out  # deterministic
        if path == kohya_file:
            assert "recorded_source_format" not in shown  # no loraswap metadata
        else:
            assert shown["recorded_source_format"] == "kohya"
    assert json.loads(run(capsys, "inspect", str(kohya))[1])["tensors"] > len(read_adapter(diffusers)[0])
