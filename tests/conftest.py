"""Shared fixtures: the embedded tiny-sd model is built once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread per process (inherited by the servers and CLIs the tests start). The models here
# are tiny, so a second thread buys little when idle, and on a loaded 2-core machine OpenMP threads that
# spin-wait for a core turn a 20 s test into minutes. Set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# `make test` runs two workers (pytest -n 2 --dist loadfile --no-loadscope-reorder): each file goes whole to
# one worker, in collection order. The files that take longest go first, so that neither worker is handed
# a long file at the end while the other idles; the order is otherwise the usual one (a stable sort). Kept
# by hand from the suite's --durations report (docs/benchmarks.md, "Test suite time"); a file missing from
# the list only runs later, nothing breaks.
LONGEST_FILES_FIRST = (
    "tests/service/test_readme.py",
    "tests/loadtests/test_bench_mmdit.py",
    "tests/ray/test_fleet.py",
    "tests/reliability/test_crash_consistency.py",
    "tests/training/test_concept_demo.py",
    "tests/loadtests/test_bench_sdxl.py",
    "tests/service/test_hotswap.py",
    "tests/basemodel/test_pretrain.py",
    "tests/training/test_cli.py",
    "tests/service/test_process.py",
    "tests/training/test_checkpoint.py",
    "tests/service/test_sdxl.py",
    "tests/basemodel/test_tiny_and_identity.py",
    "tests/service/test_img2img.py",
    "tests/training/test_end_to_end.py",
    "tests/training/test_options.py",
    "tests/training/test_sdxl.py",
    "tests/reliability/test_fuzz_api.py",
    "tests/service/test_dora_serving.py",
    "tests/training/test_dora.py",
    "tests/loadtests/test_load_harness.py",
    "tests/service/test_lifecycle.py",
    "tests/service/test_lora_paths.py",
    "tests/training/test_flow.py",
    "tests/ui/test_console.py",
    "tests/service/test_embeddings.py",
    "tests/service/test_flux.py",
    "tests/service/test_sd3.py",
    "tests/service/test_dora_transformers_serving.py",
    "tests/basemodel/test_single_file_mmdit.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


# Files that share a costly session fixture go to the same worker, so that it is built once: file → the file
# whose worker runs it too.
SAME_WORKER_AS = {
    "tests/training/test_serving.py": "tests/training/test_end_to_end.py",  # the `trained` run
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadfile, with the files of SAME_WORKER_AS in one work unit (None: xdist's own choice)."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER_AS.get(scope, scope)

    return SharedFixtureFileScheduling(config, log)


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
