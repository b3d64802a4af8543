"""Parametrisation shared by the bounded fuzz tests: one strict xfail per unfixed known defect."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from loadtests.fuzz.known import KnownDefect


def defect_params(defects: Iterable[KnownDefect]) -> list[Any]:
    """``pytest.param`` per defect; unfixed ones are ``xfail(strict=True)``, so a fix shows as XPASS."""
    return [
        pytest.param(d, id=d.key, marks=[] if d.fixed else pytest.mark.xfail(strict=True, reason=d.reason))
        for d in defects
    ]
