"""Adapter references in the CLI client and A1111 prompt tags; package boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from basemodel.errors import ValidationFailed
from service.client import parse_adapter_ref
from service.lora.request import AdapterRequest, extract_prompt_adapters

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("ref", "spec"),
    [
        ("style", {"id": "style"}),
        ("style@3", {"id": "style", "version": 3}),
        ("style@latest", {"id": "style"}),
        ("style:0.8", {"id": "style", "scale": 0.8}),
        ("style@2:-0.5", {"id": "style", "version": 2, "scale": -0.5}),
    ],
)
def test_cli_adapter_refs(ref: str, spec: dict[str, object]) -> None:
    assert parse_adapter_ref(ref) == spec


@pytest.mark.parametrize("ref", ["", "../x", "Style", "a@b", "a:x"])
def test_bad_cli_adapter_refs(ref: str) -> None:
    with pytest.raises(ValidationFailed):
        parse_adapter_ref(ref)


def test_prompt_tags_are_extracted_and_stripped() -> None:
    prompt, found = extract_prompt_adapters("a castle <lora:watercolor:0.8>, <LORA:ink@2> at night")
    assert prompt == "a castle , at night"
    assert found == [AdapterRequest("watercolor", None, 0.8), AdapterRequest("ink", 2, None)]
    assert extract_prompt_adapters("no tags  here") == ("no tags  here", [])
    with pytest.raises(ValidationFailed):
        extract_prompt_adapters("<lora:x:heavy>")


def test_adapters_package_does_not_import_service_or_training() -> None:
    for path in (ROOT / "adapters").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("service", "training"), f"{path}: imports {name}"
