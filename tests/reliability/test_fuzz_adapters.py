"""Bounded adapter-file fuzzing (the full run: ``python -m loadtests.fuzz adapters --cases 10000``).

One seeded run of a few hundred structured mutations of valid tiny-sd LoRA files, registered into a
real ``Registry`` over a local store (``loadtests/fuzz/adapters.py`` says what is mutated and checked).
Each family must produce no crash, no stored-invalid version, no accepted hostile file and no refused
valid file — except the symptoms of the known, unfixed defects in ``loadtests/fuzz/known.py``, each of
which has its own strict-xfail test here: when its fix lands the test XPASSes (and fails) until the
defect is marked ``fixed=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.identity import BaseIdentity
from loadtests.fuzz.adapters import FAMILIES, Report, Result, check_seeds, run, run_reproducers
from loadtests.fuzz.known import ADAPTER_DEFECTS, KnownDefect, unfixed
from loadtests.fuzz.reproducers import REPRODUCERS
from tests.reliability.fuzz_params import defect_params

# cases per family; ~400 in all, a few seconds on an idle 2-core machine
CASES = {
    "container": 40,
    "header": 40,
    "json": 30,
    "nesting": 20,
    "keys": 40,
    "values": 40,
    "alpha": 25,
    "metadata": 50,
    "metadata_size": 10,
    "scale": 25,
    "ids": 15,
    "benign": 40,
}
MIXED_CASES = 40  # cases whose mutations come from every family at once
SEED = 12


@pytest.fixture(scope="module")
def base_identity(base_model: Any) -> BaseIdentity:
    return BaseIdentity.from_base_model(base_model)


@pytest.fixture(scope="module")
def reports(base_identity: BaseIdentity, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Report]:
    """One seeded run per family and one mixed run, shared by every test below."""
    workdir = tmp_path_factory.mktemp("fuzz-adapters")
    out = {f: run(base_identity, cases=n, families=[f], seed=SEED, workdir=workdir) for f, n in CASES.items()}
    out["mixed"] = run(base_identity, cases=MIXED_CASES, families=list(FAMILIES), seed=SEED, workdir=workdir)
    return out


def test_every_family_is_fuzzed() -> None:
    assert set(CASES) == set(FAMILIES)


def test_seeds_are_valid(base_identity: BaseIdentity, tmp_path: Path) -> None:
    """The fuzzer starts from files that register and pass every reader, in every layout."""
    assert check_seeds(base_identity, tmp_path) == []


@pytest.mark.parametrize("family", [*CASES, "mixed"])
def test_family_has_no_unexplained_failure(reports: dict[str, Report], family: str) -> None:
    report = reports[family]
    assert len(report.results) >= 0.8 * CASES.get(family, MIXED_CASES)
    assert report.count("registered") + report.count("refused") > 0
    failures = report.unexplained(ignore=unfixed(ADAPTER_DEFECTS))
    assert failures == [], report.summary()


@pytest.fixture(scope="module")
def reproduced(base_identity: BaseIdentity, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    return run_reproducers(base_identity, tmp_path_factory.mktemp("fuzz-repro"))


def test_every_known_defect_has_a_reproducer() -> None:
    assert set(REPRODUCERS) == {d.key for d in ADAPTER_DEFECTS}


@pytest.mark.parametrize("defect", defect_params(ADAPTER_DEFECTS))
def test_known_defect_is_gone(
    reports: dict[str, Report], reproduced: dict[str, Result], defect: KnownDefect
) -> None:
    """Neither the defect's fixed reproducer nor any fuzz case shows its symptom."""
    result = reproduced[defect.key]
    assert result.kind in ("registered", "refused"), f"reproducer: {result.kind}: {result.detail}"
    hits = [r for report in reports.values() for r in report.failures() if defect.matches(r.kind, r.detail)]
    assert hits == [], f"{len(hits)} fuzz case(s), e.g. {hits[0].detail} <- {list(hits[0].case.labels)}"


def test_reproducers_show_their_defect(reproduced: dict[str, Result]) -> None:
    """Each reproducer of an unfixed defect fails the way its defect is recognised (keeps known.py honest)."""
    for defect in unfixed(ADAPTER_DEFECTS):
        result = reproduced[defect.key]
        assert defect.matches(result.kind, result.detail), f"{defect.key}: {result.kind}: {result.detail}"


def test_benign_files_register(reports: dict[str, Report]) -> None:
    """Most benign cases register (the oracle for refused_valid has something to judge)."""
    report = reports["benign"]
    assert report.count("registered") >= 0.8 * len(report.results)
