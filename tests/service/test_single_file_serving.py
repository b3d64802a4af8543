"""``loraswap serve --base-model flux1-dev.safetensors --base-components FOLDER``: the settings reach the
runtime's loader, and the server on BFL's transformer file draws what the server on the diffusers folder
draws (the architecture ids are compared in tests/basemodel/test_single_file_mmdit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from basemodel.families.flux.single_file import to_single_file
from basemodel.families.flux.tiny import build_tiny_flux_pipeline, save_tiny_flux
from basemodel.fingerprint import sha256_file
from service.engine.runtime import _default_loader
from tests.service.test_hotswap import generate, pixels


def test_a_flux_single_file_base_serves_what_its_folder_serves(start_server: Any, tmp_path: Path) -> None:
    folder = save_tiny_flux(tmp_path / "tiny-flux-random")
    checkpoint = tmp_path / "flux1-dev.safetensors"
    save_file(to_single_file(build_tiny_flux_pipeline(), all_in_one=False), str(checkpoint))
    by_file = start_server(loader=_default_loader, base_model=str(checkpoint), base_components=folder)
    by_folder = start_server(loader=_default_loader, base_model=str(folder))
    request = {"width": 32, "height": 32, "steps": 2}
    images = [pixels(generate(server, **request)["images"][0]) for server in (by_file, by_folder)]
    assert (images[0] == images[1]).all()
    with by_file.client() as http:
        model = http.get("/readyz").json()["model"]
    assert model == {"name": "flux1-dev", "fingerprint": sha256_file(checkpoint)}
