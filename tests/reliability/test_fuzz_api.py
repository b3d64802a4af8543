"""Bounded schemathesis run against a real server on loopback (full run: ``python -m loadtests.fuzz api``).

Every operation in ``/schema`` gets a few positive and negative cases with the admin token, one per
auth role, and the fixed hostile requests of ``loadtests/fuzz/api_hostile.py``; every response is
judged by schemathesis' checks (0 5xx, documented statuses, response schema, content type, headers,
negative data rejected). Failures that are symptoms of known, unfixed defects (``known.API_DEFECTS``)
are left to their strict-xfail tests; any other failure fails ``test_no_unexplained_failure``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from loadtests.fuzz.api import ApiReport, run_api
from loadtests.fuzz.known import API_DEFECTS, KnownDefect, unfixed
from loadtests.fuzz.server import fuzz_target
from tests.reliability.fuzz_params import defect_params

EXAMPLES = 6  # per operation and mode (positive, negative)
AUTH_EXAMPLES = 1  # per operation and role (anonymous, bogus token, generate token)
SEED = 12


@pytest.fixture(scope="module")
def report(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiReport]:
    with fuzz_target(base_model, tmp_path_factory.mktemp("fuzz-api-home")) as target:
        yield run_api(target, examples=EXAMPLES, seed=SEED, auth_examples=AUTH_EXAMPLES)


def test_every_operation_is_exercised(report: ApiReport) -> None:
    assert len(report.documented) >= 10
    exercised = {call.operation for call in report.calls if call.status is not None}
    assert exercised == set(report.documented)


def test_some_requests_succeed(report: ApiReport) -> None:
    """The harness reaches the real work: generations, registrations and reads answer 2xx."""
    ok = {call.operation for call in report.calls if call.status is not None and call.status < 300}
    assert {"POST /v1/generate", "POST /v1/adapters", "GET /v1/adapters/{adapter_id}"} <= ok


def test_no_unexplained_failure(report: ApiReport) -> None:
    failures = report.unexplained(ignore=unfixed(API_DEFECTS))
    assert failures == [], report.summary()


@pytest.mark.parametrize("defect", defect_params(API_DEFECTS))
def test_known_defect_is_gone(report: ApiReport, defect: KnownDefect) -> None:
    hits = [f for f in report.failures() if report.defect_key(*f) == defect.key]
    assert hits == [], (
        f"{len(hits)} failure(s), e.g. {hits[0][0].operation} [{hits[0][0].source}] {hits[0][2]}"
    )
