"""API fuzzer: schemathesis against every operation in ``/schema`` of a real server on loopback.

For each operation (DELETEs last, the fixture adapters restored before each operation):

* ``positive`` and ``negative`` cases from schemathesis' Hypothesis strategies, sent with the admin
  token (every route is exercised authenticated);
* ``auth`` cases: positive cases sent without a token, with a wrong one and with a generate-only one;
* ``hostile`` cases (``api_hostile.py``): fixed requests for what schemathesis does not generate —
  deeply nested JSON, A1111 prompt tags with NaN/inf/99, strings and booleans for numbers, bucket
  names that are not bucket names, hostile scale_default and metadata, and each known adapter-file
  reproducer uploaded over HTTP — each with the status it must get.

Every response is judged by schemathesis' checks: ``not_a_server_error`` (0 5xx),
``status_code_conformance`` (every status returned is documented), ``content_type_conformance``,
``response_schema_conformance``, ``response_headers_conformance`` and, for negative cases,
``negative_data_rejection``; hostile cases also by their expectation. Failures are recorded, never
raised, so a run reports them all; ``known.API_DEFECTS`` says which are known.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import given
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from loadtests.fuzz.adapters import fuzz_settings
from loadtests.fuzz.api_hostile import Hostile, hostile_cases
from loadtests.fuzz.known import API_DEFECTS, KnownDefect, classify
from loadtests.fuzz.report import render_rows
from loadtests.fuzz.server import ADMIN_TOKEN, GENERATE_TOKEN, FuzzTarget

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
ROLES: dict[str, str | None] = {
    "anonymous": None,
    "bogus": "not-a-real-token-0123456789",
    "generate": GENERATE_TOKEN,
}
# schemathesis' defaults, plus 413: a schema-violating upload may be refused for its size first (a
# garbage file whose first 8 bytes announce a huge header) — that is a rejection too. Explicit, so no
# schemathesis.toml found in the working directory changes a run.
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
SCHEMATHESIS_CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)
DEFAULT_SEED = 12
TIMEOUT_S = 120


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class Call:
    operation: str  # "POST /v1/generate"
    source: str  # positive / negative / auth:<role> / hostile:<label>
    status: int | None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (check, what failed)
    curl: str = ""


@dataclass
class ApiReport:
    seed: int
    examples: int
    documented: dict[str, list[str]]  # operation -> documented status codes
    calls: list[Call] = field(default_factory=list)
    seconds: float = 0.0

    def failures(self) -> list[tuple[Call, str, str]]:
        return [(call, check, detail) for call in self.calls for check, detail in call.failures]

    def defect_key(self, call: Call, check: str, detail: str) -> str:
        defect = classify(API_DEFECTS, check, f"{call.source} {call.operation} {detail}")
        return defect.key if defect else "unknown"

    def defects(self) -> Counter[str]:
        return Counter(self.defect_key(*failure) for failure in self.failures())

    def unexplained(self, ignore: Iterable[KnownDefect] = ()) -> list[tuple[Call, str, str]]:
        ignored = {d.key for d in ignore}
        return [f for f in self.failures() if self.defect_key(*f) not in ignored]

    def rows(self) -> list[list[str]]:
        rows = [["operation", "calls", "2xx", "4xx", "5xx", "failed", "statuses seen", "documented"]]
        for operation in [*self.documented, "all"]:
            calls = [c for c in self.calls if operation in ("all", c.operation)]
            statuses = Counter(c.status for c in calls)
            by_class = Counter((s or 0) // 100 for s in statuses.elements())
            seen = ",".join(str(s) for s in sorted(statuses, key=lambda s: s or 0))
            rows.append(
                [
                    operation,
                    str(len(calls)),
                    *(str(by_class[k]) for k in (2, 4, 5)),
                    str(sum(bool(c.failures) for c in calls)),
                    seen,
                    ",".join(self.documented.get(operation, [])),
                ]
            )
        return rows

    def check_counts(self) -> Counter[str]:
        return Counter(check for _, check, _ in self.failures())

    def summary(self, limit: int = 20) -> str:
        lines = [render_rows(self.rows()), ""]
        lines += [f"failed check {n:>5} × {check}" for check, n in self.check_counts().most_common()]
        lines += [f"failures {n:>5} × defect {key}" for key, n in self.defects().most_common()]
        groups = Counter((c.operation, check, one_line(detail)) for c, check, detail in self.failures())
        for (operation, check, detail), n in groups.most_common(limit):
            lines.append(f"{n:>5} × {operation} {check}: {detail}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        groups: dict[tuple[str, str, str, str], list[Call]] = {}
        for call, check, detail in self.failures():
            key = (call.operation, check, one_line(detail), self.defect_key(call, check, detail))
            groups.setdefault(key, []).append(call)
        return {
            "suite": "api",
            "seed": self.seed,
            "examples_per_operation_and_mode": self.examples,
            "calls": len(self.calls),
            "seconds": round(self.seconds, 2),
            "operations": {
                row[0]: dict(zip(self.rows()[0][1:], row[1:], strict=True)) for row in self.rows()[1:]
            },
            "failed_checks": dict(self.check_counts().most_common()),
            "failures_by_defect": dict(self.defects().most_common()),
            "failures": [
                {
                    "operation": op,
                    "check": check,
                    "detail": detail,
                    "defect": defect,
                    "count": len(calls),
                    "sources": sorted({c.source for c in calls}),
                    "curl": calls[0].curl[:2000],
                }
                for (op, check, detail, defect), calls in groups.items()
            ],
        }


def one_line(detail: str) -> str:
    return " | ".join(detail.split("\n"))[:200]


# -- judging one response ---------------------------------------------------------------------------


def judge(case: Any, response: Any, checks: list[Any], headers: dict[str, str]) -> list[tuple[str, str]]:
    """schemathesis' verdict on ``response`` to ``case``: [(check, failure)] (empty when it passed).

    A 5xx counts once, as ``not_a_server_error``: its being undocumented as well is not a second finding.
    """
    if response.status_code >= 500:
        checks = [c for c in checks if c is not status_code_conformance]
    try:
        case.validate_response(response, checks=checks, headers=headers)
    except FailureGroup as group:
        return [failure_entry(f) for f in group.exceptions]
    except Failure as failure:
        return [failure_entry(failure)]
    return []


def failure_entry(failure: Failure) -> tuple[str, str]:
    check = failure.checks[0] if failure.checks else type(failure).__name__
    return check, f"{failure.title}: {failure.message}".strip()


def send(case: Any, url: str, headers: dict[str, str]) -> tuple[Any | None, str | None]:
    """(response, None) or (None, transport error)."""
    try:
        return case.call(base_url=url, headers=headers, timeout=TIMEOUT_S), None
    except Exception as exc:  # connection reset, timeout …: the server did not answer
        return None, f"{type(exc).__name__}: {exc}"[:300]


def curl_of(case: Any, headers: dict[str, str]) -> str:
    try:
        return str(case.as_curl_command(headers=headers))
    except Exception:
        return ""


# -- the run --------------------------------------------------------------------------------------


def operation_order(schema: Any) -> list[Any]:
    operations = [result.ok() for result in schema.get_all_operations()]
    return sorted(operations, key=lambda op: (op.method.upper() == "DELETE", op.path, op.method))


def fuzz_operation(
    target: FuzzTarget,
    operation: Any,
    *,
    mode: GenerationMode,
    source: str,
    token: str | None,
    examples: int,
    seed: int,
    record: Callable[[Call], None],
) -> None:
    """``examples`` generated cases of ``operation`` in ``mode``, each sent and judged."""
    headers = bearer(token)
    checks = NEGATIVE_CHECKS if mode == GenerationMode.NEGATIVE else CHECKS
    label = f"{operation.method.upper()} {operation.path}"

    @hypothesis_seed(seed)
    @fuzz_settings(examples)
    @given(operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        response, error = send(case, target.url, headers)
        if response is None:
            record(Call(label, source, None, [("transport", str(error))], curl_of(case, headers)))
            return
        failures = judge(case, response, checks, headers)
        record(
            Call(label, source, response.status_code, failures, curl_of(case, headers) if failures else "")
        )

    with contextlib.suppress(Unsatisfiable):  # nothing to negate (no parameters, no body): nothing sent
        one()


def run_hostile(
    target: FuzzTarget, operations: dict[str, Any], hostile: Hostile, record: Callable[[Call], None]
) -> None:
    """One fixed hostile request (and its follow-ups), judged by the checks and its expectation."""
    headers = bearer(ADMIN_TOKEN)
    source = f"hostile:{hostile.label}"
    with requests.Session() as http:
        for step in hostile.steps:
            case = operations[step.operation].Case(path_parameters=step.path_parameters or None)
            method = step.operation.split(" ", 1)[0]
            try:
                response = http.request(
                    method,
                    target.url + step.url(),
                    headers={**headers, **step.headers},
                    timeout=TIMEOUT_S,
                    **step.request,
                )
            except requests.RequestException as exc:
                record(Call(step.operation, source, None, [("transport", repr(exc)[:300])], step.describe()))
                return
            failures = judge(case, response, CHECKS, headers)
            if not step.expect(response.status_code):
                wanted = f"got {response.status_code}, expected {step.expect_text}: {response.text[:300]}"
                failures.append(("expectation", wanted))
            record(Call(step.operation, source, response.status_code, failures, step.describe()))


def run_api(
    target: FuzzTarget,
    *,
    examples: int,
    seed: int = DEFAULT_SEED,
    auth_examples: int = 2,
    hostile: Sequence[Hostile] | None = None,
    only: Sequence[str] = (),
) -> ApiReport:
    """Fuzz every operation of the target's /schema (``only``: just these 'METHOD /path' labels)."""
    schema = schemathesis.openapi.from_url(target.schema_url, config=SCHEMATHESIS_CONFIG, timeout=60)
    operations = {f"{op.method.upper()} {op.path}": op for op in operation_order(schema)}
    chosen = {k: v for k, v in operations.items() if not only or k in only}
    documented = {k: sorted(op.responses.status_codes) for k, op in chosen.items()}
    report = ApiReport(seed=seed, examples=examples, documented=documented)
    started = time.monotonic()
    for operation in chosen.values():
        target.restore_fixtures()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(
                target,
                operation,
                mode=mode,
                source=mode.value,
                token=ADMIN_TOKEN,
                examples=examples,
                seed=seed,
                record=report.calls.append,
            )
        for role, token in ROLES.items():
            fuzz_operation(
                target,
                operation,
                mode=GenerationMode.POSITIVE,
                source=f"auth:{role}",
                token=token,
                examples=auth_examples,
                seed=seed,
                record=report.calls.append,
            )
    for case in hostile_cases(target.base) if hostile is None else hostile:
        if all(step.operation in chosen for step in case.steps):
            target.restore_fixtures()
            run_hostile(target, operations, case, report.calls.append)
    report.seconds = time.monotonic() - started
    return report
