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
