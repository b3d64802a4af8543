"""pyproject.toml as setuptools reads it: no deprecation warning on install, and the license shipped."""

from __future__ import annotations

import tomllib
import warnings

import pytest
from setuptools.config import pyprojecttoml
from setuptools.dist import Distribution

from tests.deploy.manifests import DEPLOY, dockerfile

ROOT = DEPLOY.parent


def test_pyproject_applies_without_a_setuptools_warning() -> None:
    """`pip install -e .` printed setuptools' `project.license` (TOML table) deprecation three times:
    the license is an SPDX expression with its file(s) in `license-files` (PEP 639)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = pyprojecttoml.apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
    assert dist.metadata.license_files == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_copy_the_license_files_the_build_needs(name: str) -> None:
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license-files"]
    copied = {part for op, args in dockerfile(name) if op == "COPY" for part in args.split()[:-1]}
    assert set(files) <= copied


def test_the_wheel_ships_every_shipped_weight_file() -> None:
    """``pip install .`` (the images) must carry tiny-sd's ``SHA256SUMS`` and the demo files, or
    ``init-tiny`` cannot check what it installs: package-data globbed as setuptools globs it."""
    package = ROOT / "basemodel"
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = [*data.get("*", []), *data.get("basemodel", [])]
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    weights = {p for p in (package / "weights").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {p.relative_to(package).as_posix() for p in weights - shipped} == set()
    assert (package / "weights" / "tiny-sd" / "SHA256SUMS") in shipped
