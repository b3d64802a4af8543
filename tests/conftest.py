"""Shared fixtures: the embedded tiny-sd model is built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread per process (inherited by the servers and CLIs the tests start). The models here
# are tiny, so a second thread buys little when idle, and on a loaded 2-core machine OpenMP threads that
# spin-wait for a core turn a 20 s test into minutes. Set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def loraswap_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LORASWAP_HOME for the session with tiny-sd already built in it."""
    from basemodel.tiny import ensure_tiny

    home = tmp_path_factory.mktemp("loraswap-home")
    ensure_tiny(home / "models")
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(loraswap_home: Path) -> Path:
    return loraswap_home / "models" / "tiny-sd"


@pytest.fixture(scope="session")
def base_model(loraswap_home: Path) -> Iterator[object]:
    """tiny-sd loaded on CPU in fp32 (shared; tests must not mutate its weights)."""
    from basemodel.loader import load_base_model

    yield load_base_model("tiny-sd", loraswap_home / "models", device="cpu", dtype="fp32")
