"""The demo files shipped beside tiny-sd: sha256-checked on install, installed once, a LoRA for tiny-sd."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.format import read_adapter
from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import LocalStore
from basemodel.demo import DEMO, DEMO_ADAPTER, install_demo
from basemodel.errors import BaseModelError
from basemodel.pretrain.shipped import checksums


def test_install_checks_every_file_and_installs_once(tmp_path: Path) -> None:
    target = install_demo(tmp_path / "demo")
    assert {"brown.safetensors", "init.png", "mask.png", "recipe.json"} <= set(checksums(DEMO))
    for name in checksums(DEMO):
        assert (target / name).read_bytes() == (DEMO / name).read_bytes(), name
    stamp = (target / DEMO_ADAPTER).stat().st_mtime_ns
    install_demo(target)  # the same shipped files: left as they are
    assert (target / DEMO_ADAPTER).stat().st_mtime_ns == stamp

    tampered = tmp_path / "tampered"
    shutil.copytree(DEMO, tampered)
    (tampered / "mask.png").write_bytes(b"not the shipped mask")
    with pytest.raises(BaseModelError, match=r"mask\.png does not match its sha256"):
        install_demo(tmp_path / "other", source=tampered)
    assert not (tmp_path / "other").exists()


def test_the_demo_adapter_is_a_small_tiny_sd_lora(loraswap_home: Path, tmp_path: Path) -> None:
    assert (DEMO / DEMO_ADAPTER).stat().st_size < 20_000  # a few KB
    base = BaseIdentity.from_spec("tiny-sd", loraswap_home / "models")
    version = Registry(LocalStore(tmp_path / "store"), base).register(DEMO / DEMO_ADAPTER, "brown")
    assert (version.ref, version.rank, version.base_model_match) == ("brown@1", 2, True)
    _, header = read_adapter(DEMO / DEMO_ADAPTER)
    assert "sks" in header["loraswap"] and "/tmp" not in header["loraswap"]  # compact: no local paths
