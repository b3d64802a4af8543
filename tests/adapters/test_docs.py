"""docs/adapters.md says what the code does: its tables of metadata fields, record fields and
``source_format`` values are read and compared with the code's."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from adapters.metadata import AdapterMetadata, SourceFormat
from adapters.records import AdapterVersion

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"


def table_after(header: str) -> list[list[str]]:
    """The rows (cells, header and rule excluded) of the Markdown table whose header row is ``header``."""
    lines = DOC.read_text().splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def names(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def test_the_metadata_table_lists_every_field() -> None:
    documented = set().union(*(names(row[0]) for row in table_after("| Field | Set by | Meaning |")))
    assert documented == set(AdapterMetadata.model_fields)


def test_the_record_table_lists_every_field_kind_included() -> None:
    rows = table_after("| Record field | Meaning |")
    documented = set().union(*(names(row[0]) for row in rows))
    assert documented == {"ref", *AdapterVersion.model_fields}
    kind = next(row[1] for row in rows if names(row[0]) == {"kind"})
    assert names(kind) >= set(typing.get_args(AdapterVersion.model_fields["kind"].annotation))


def test_the_source_format_table_lists_the_code_values() -> None:
    documented = {next(iter(names(row[0]))) for row in table_after("| `source_format` | Meaning |")}
    assert documented == set(typing.get_args(SourceFormat))
