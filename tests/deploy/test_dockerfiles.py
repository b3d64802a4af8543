"""deploy/Dockerfile (CPU) and deploy/Dockerfile.cuda: what an operator relies on, read from the files.

Images are not built here (no registry access); the checks are on the instructions themselves.
"""

from __future__ import annotations

import tomllib

import pytest

from tests.deploy.manifests import DEPLOY, dockerfile

ROOT = DEPLOY.parent


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_image_runs_as_non_root_and_writes_only_data(name: str) -> None:
    lines = dockerfile(name)
    ops = [op for op, _ in lines]
    user = [args for op, args in lines if op == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")  # nothing runs as root later
    env = " ".join(args for op, args in lines if op == "ENV")
    for variable in ("LORASWAP_HOME=/data", "HOME=/data", "TMPDIR=/data", "HF_HUB_OFFLINE=1"):
        assert variable in env
    assert ("VOLUME", "/data") in lines
    assert lines[-1] == ("CMD", '["loraswap", "serve"]')


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_image_copies_every_package_it_installs(name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {args.split()[0] for op, args in dockerfile(name) if op == "COPY"}
    assert packages <= copied
    assert all((ROOT / path).exists() for path in copied)


def test_cuda_image_uses_nvidia_runtime_cuda_torch_and_the_xformers_extra() -> None:
    lines = dockerfile("Dockerfile.cuda")
    args = dict(a.split("=", 1) for op, a in lines if op == "ARG" and "=" in a)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(args["EXTRAS"].split(",")) <= set(extras)
    assert "xformers" in args["EXTRAS"]
