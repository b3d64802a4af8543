"""Did-you-mean for names a client got wrong: request fields, and names from a fixed list.

A strict request model refuses unknown fields (``extra="forbid"``); the 422 then says which field was
probably meant — ``guidance`` → ``guidance_scale``, ``adapters.0.scal`` → ``scale`` — found with
``difflib`` among the fields of the model at that place of the body (nested models and lists are
followed).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any, get_args

from pydantic import BaseModel

UNKNOWN_FIELD = "Extra inputs are not permitted"  # pydantic's message for extra="forbid"


def closest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice most like ``name`` (case-insensitive; one that starts with it first), or None."""
    options = list(choices)
    lowered = {option.lower(): option for option in options}
    wanted = name.lower()
    extended = [option for option in options if option.lower().startswith(wanted) and wanted]
    if extended:
        return extended[0]
    found = difflib.get_close_matches(wanted, list(lowered), n=1, cutoff=cutoff)
    return lowered[found[0]] if found else None


def field_names(model: type[BaseModel]) -> list[str]:
    """The names a client may send for ``model``'s fields (aliases included)."""
    names = []
    for name, info in model.model_fields.items():
        names.append(name)
        if isinstance(info.alias, str) and info.alias != name:
            names.append(info.alias)
    return names


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def model_at(model: type[BaseModel], path: Sequence[str]) -> type[BaseModel] | None:
    """The model that holds the field at ``path`` (dotted key parts; list indexes are skipped)."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None:
            return None
        if part.isdigit():
            continue
        info = current.model_fields.get(part)
        current = None if info is None else _model_in(info.annotation)
    return current


def unknown_field(model: Any, key: str) -> str | None:
    """For the unknown field ``key`` (dotted) of a body validated as ``model``: the field probably
    meant, or None."""
    if _model_in(model) is None:
        return None
    *parents, name = key.split(".")
    holder = model_at(_model_in(model), parents)  # type: ignore[arg-type]
    return None if holder is None else closest(name, field_names(holder))
