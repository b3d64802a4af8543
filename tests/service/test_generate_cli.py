"""``loraswap generate --init-image PATH [--mask PATH] [--strength X]`` against a live server: the PNG it
writes is the image ``POST /v1/generate`` returns for the same base64 inputs, and bad uses fail with a
message (no request sent for a missing file; the server's typed error for a bad image)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.cli import main
from tests.service.test_hotswap import pixels
from tests.service.test_img2img import picture, square_mask


def _png(image: Image.Image, path: Path) -> Path:
    image.save(path, format="PNG")
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_generate_sends_init_image_mask_and_strength(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = _png(picture(), tmp_path / "init.png")
    mask = _png(square_mask(), tmp_path / "mask.png")
    common = ["--server", server.url, "--steps", "4", "--seed", "7", "--no-progress"]
    cases = {
        "img2img": (
            ["--init-image", str(init), "--strength", "0.5"],
            {"init_image": _b64(init), "strength": 0.5},
        ),
        "inpaint": (
            ["--init-image", str(init), "--mask", str(mask), "--strength", "0.9"],
            {"init_image": _b64(init), "mask_image": _b64(mask), "strength": 0.9},
        ),
    }
    body = {"prompt": "a red circle", "steps": 4, "seed": 7}
    with server.client() as http:
        plain = pixels(http.post("/v1/generate", json=body).json()["images"][0])
        for name, (flags, fields) in cases.items():
            out = tmp_path / f"{name}.png"
            assert main(["generate", "a red circle", *common, *flags, "-o", str(out)]) == 0, (
                capsys.readouterr()
            )
            assert "seed 7" in capsys.readouterr().out
            direct = http.post("/v1/generate", json={**body, **fields}).json()
            want = pixels(direct["images"][0])
            got = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"), dtype=np.int16)
            assert np.array_equal(got, want), name
            assert np.abs(got - plain).mean() > 2, f"{name}: the init image was used"
    # The mask was sent: the inpainted image keeps the init image outside the white area better than inside.
    init_pixels = np.asarray(picture(), dtype=np.int16)
    inpainted = np.asarray(Image.open(tmp_path / "inpaint.png").convert("RGB"), dtype=np.int16)
    repaint = np.asarray(square_mask()) > 0
    change = np.abs(inpainted - init_pixels).mean(axis=-1)
    assert change[~repaint].mean() < change[repaint].mean()


def test_generate_image_flags_fail_with_a_message(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--server", server.url, "--steps", "2", "--no-progress", "-o", str(tmp_path / "x.png")]
    assert main(["generate", "x", *common, "--init-image", str(tmp_path / "missing.png")]) == 2
    assert "--init-image" in capsys.readouterr().err
    assert main(["generate", "x", *common, "--mask", str(tmp_path / "m.png")]) == 2
    assert "--init-image" in capsys.readouterr().err
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    assert main(["generate", "x", *common, "--init-image", str(garbage)]) != 0
    assert "init_image" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
