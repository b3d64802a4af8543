"""Adapter-file fuzzer: structured mutations of valid LoRA files, registered into a real ``Registry``.

Hypothesis draws a seed file (``seeds.py``) and one to three mutations (``mutate_container.py``,
``mutate_content.py``); the case is registered into a fresh ``LocalStore`` with tiny-sd as the base.
The property, per case:

* the registration either succeeds, or raises one of our typed errors (a ``LoraswapError`` that the
  HTTP layer maps to a 4xx). Anything else (``KeyError``, ``RecursionError``, ``struct.error``,
  safetensors' own exceptions, ``MemoryError``, or a ``LoraswapError`` mapped to 5xx) is a **crash**;
* a successful registration leaves a version that every reader accepts: ``open`` (sha256, header,
  canonical tensors, architecture), ``resolve``, ``list``, ``versions``, the ``show`` routes' bodies
  (strict JSON) and the header-only metadata read; ``scale_default`` within the request limits and
  equal to what was given. Otherwise the case is **stored invalid**;
* a refused registration leaves no file in the store;
* a case made only of ``benign`` mutations (``mutate_benign.py``) is a valid file and must register,
  else it is **refused valid**;
* a case a mutation marks as hostile (non-finite values, unsupported dtypes, wrong length field,
  scale_default outside the request limits, alpha <= 0 or absurd …) must be refused, else it is
  **accepted hostile**.

Hypothesis is used as a structured generator: the property records outcomes instead of failing, so
a run always completes and reports every failure (no shrinking), reproducibly for a given ``seed``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from adapters.identity import BaseIdentity
from adapters.records import AdapterVersion
from adapters.registry import Registry
from adapters.sources import LocalStore
from adapters.sources.local import TMP_PREFIX
from basemodel.errors import LoraswapError
from loadtests.fuzz.draft import UNSET, Case, Mutation, build, in_range
from loadtests.fuzz.known import ADAPTER_DEFECTS, KnownDefect, classify
from loadtests.fuzz.mutate_benign import BENIGN
from loadtests.fuzz.mutate_container import CONTAINER, HEADER, JSON_TEXT, NESTING
from loadtests.fuzz.mutate_content import (
    ALPHA,
    IDS,
    KEYS,
    MAX_RANK,
    METADATA,
    METADATA_SIZE,
    SCALE,
    VALUES,
)
from loadtests.fuzz.report import failure_record, render_rows
from loadtests.fuzz.reproducers import reproducer_cases
from loadtests.fuzz.seeds import Seed, make_seeds, serialise
from service.controllers.adapters import adapter_detail, describe_version
from service.errors import status_for
from service.schemas import AdapterSpec

FAMILIES: dict[str, st.SearchStrategy[Mutation]] = {
    "container": CONTAINER,
    "header": HEADER,
    "json": JSON_TEXT,
    "nesting": NESTING,
    "keys": KEYS,
    "values": VALUES,
    "alpha": ALPHA,
    "metadata": METADATA,
    "metadata_size": METADATA_SIZE,
    "scale": SCALE,
    "ids": IDS,
    "benign": BENIGN,
}
FAILURES = ("crash", "stored_invalid", "accepted_hostile", "refused_valid")
KINDS = ("registered", "refused", *FAILURES)
DEFAULT_SEED = 12


def fuzz_settings(cases: int) -> settings:
    """Hypothesis as a generator: no database, no deadline, no shrinking (failures are recorded)."""
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=False,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def scale_bounds() -> tuple[float, float]:
    """The scale range a request may ask for (``AdapterSpec.scale``); a stored default must be inside."""
    lo = hi = math.nan
    for item in AdapterSpec.model_fields["scale"].metadata:
        lo = getattr(item, "ge", lo)
        hi = getattr(item, "le", hi)
    if math.isnan(lo) or math.isnan(hi):
        raise LookupError("AdapterSpec.scale has no ge/le bounds: the fuzzer cannot check scale_default")
    return float(lo), float(hi)


@dataclass(frozen=True)
class Result:
    kind: str  # one of KINDS
    detail: str  # error type (refused), exception and place (crash), the problem (stored invalid …)
    case: Case

    @property
    def families(self) -> list[str]:
        return sorted({label.split(":", 1)[0] for label in self.case.labels})


@dataclass
class Report:
    seed: int
    families: list[str]
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, kind: str, family: str | None = None) -> int:
        return sum(r.kind == kind and (family is None or family in r.families) for r in self.results)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.kind in FAILURES]

    def refusals(self) -> Counter[str]:
        return Counter(r.detail for r in self.results if r.kind == "refused")

    def rows(self) -> list[list[str]]:
        rows = [["family", "cases", *KINDS]]
        for family in [*self.families, None]:
            cases = sum(family is None or family in r.families for r in self.results)
            rows.append([family or "all", str(cases), *(str(self.count(k, family)) for k in KINDS)])
        return rows

    def defects(self) -> Counter[str]:
        """Failures per known defect (``unknown``: not a known one — a new finding)."""
        return Counter(defect_key(r) for r in self.failures())

    def unexplained(self, ignore: Iterable[KnownDefect] = ()) -> list[Result]:
        """Failures not caused by one of ``ignore``."""
        ignored = {d.key for d in ignore}
        return [r for r in self.failures() if defect_key(r) not in ignored]

    def summary(self, limit: int = 20) -> str:
        lines = [render_rows(self.rows()), ""]
        lines += [f"refused {n:>6} × {kind}" for kind, n in self.refusals().most_common()]
        lines += [f"failures {n:>5} × defect {key}" for key, n in self.defects().most_common()]
        groups: dict[tuple[str, str], list[Result]] = {}
        for result in self.failures():
            groups.setdefault((result.kind, signature(result.detail)), []).append(result)
        for (kind, _), items in sorted(groups.items(), key=lambda g: -len(g[1]))[:limit]:
            labels = f"{items[0].case.seed} {list(items[0].case.labels)}"
            lines.append(f"{len(items):>5} × {kind}: {items[0].detail[:150]} <- {labels}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        groups: dict[tuple[str, str], list[Result]] = {}
        for result in self.failures():
            groups.setdefault((result.kind, signature(result.detail)), []).append(result)
        return {
            "suite": "adapters",
            "cases": len(self.results),
            "seed": self.seed,
            "families": self.families,
            "seconds": round(self.seconds, 2),
            "outcomes": {k: self.count(k) for k in KINDS},
            "by_family": {
                row[0]: dict(zip(["cases", *KINDS], map(int, row[1:]), strict=True))
                for row in self.rows()[1:]
            },
            "refusals": dict(self.refusals().most_common()),
            "failures_by_defect": dict(self.defects().most_common()),
            "failures": [
                {
                    "kind": kind,
                    "detail": detail,
                    "defect": defect_key(items[0]),
                    "count": len(items),
                    "examples": [failure_record(r.case) for r in items[:3]],
                }
                for (kind, detail), items in groups.items()
            ],
        }


def signature(detail: str) -> str:
    """``detail`` with numbers and quoted values blanked: failures that differ only in those group."""
    return re.sub(r"'[^']*'|\d+", "…", detail)[:200]


def defect_key(result: Result) -> str:
    defect = classify(ADAPTER_DEFECTS, result.kind, result.detail)
    return defect.key if defect else "unknown"


# -- one case -------------------------------------------------------------------------------------


def crash_detail(exc: BaseException) -> str:
    """``ExcType at pkg/module.py:line function: message`` with the deepest frame in our packages."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = Path(frame.filename).parts
        for package in ("adapters", "basemodel", "service"):
            if package in parts:
                where = f"{'/'.join(parts[parts.index(package) :])}:{frame.lineno} {frame.name}"
    return f"{type(exc).__name__} at {where}: {str(exc)[:160]}"


def register_case(case: Case, base: BaseIdentity, root: Path, bounds: tuple[float, float]) -> Result:
    """Register ``case`` into a fresh store under ``root`` and judge the outcome (see the module doc)."""
    registry = Registry(LocalStore(root), base, max_rank=MAX_RANK)
    try:
        version, _ = registry.register_outcome(
            case.data, case.adapter_id, case.metadata, scale_default=case.scale_default
        )
    except LoraswapError as exc:
        if status_for(exc) >= 500:
            return Result("crash", f"{exc.type} (HTTP {status_for(exc)}) {crash_detail(exc)}", case)
        left = [p.name for p in root.rglob("*") if p.is_file()]
        if left:
            return Result("stored_invalid", f"files left after a refused registration: {left[:3]}", case)
        refusal = f"{exc.type}/{exc.detail.get('reason', '-')}"
        if case.must_register:
            return Result("refused_valid", f"valid file refused: {refusal}: {exc.message[:120]}", case)
        return Result("refused", refusal, case)
    except Exception as exc:  # the property: nothing but our typed errors escapes
        return Result("crash", crash_detail(exc), case)
    problems = stored_problems(registry, version, case, root, bounds)
    if problems:
        return Result("stored_invalid", problems[0], case)
    if case.refuse:
        return Result("accepted_hostile", f"registered although {case.refuse[0]}", case)
    return Result("registered", version.source_format, case)


def stored_problems(
    registry: Registry, version: AdapterVersion, case: Case, root: Path, bounds: tuple[float, float]
) -> list[str]:
    """What is wrong with a registered version, as every reader sees it ([] when nothing)."""
    try:
        registry.open(version.ref)
        resolved = registry.resolve(version.adapter_id)
        listed = {s.adapter_id: s.latest for s in registry.list()}
        numbers = [v.version for v in registry.versions(version.adapter_id)]
        shown = describe_version(registry, version.ref)
        detail = adapter_detail(registry, version.adapter_id)
        json.dumps([shown, detail], allow_nan=False)
    except Exception as exc:
        return [f"stored version unreadable: {crash_detail(exc)}"]
    problems = []
    for name, other in (("resolve", resolved), ("list", listed.get(version.adapter_id))):
        changed = record_changes(version, other)
        if changed:
            problems.append(f"the record read back by {name} differs in {changed}")
    if numbers != [version.version]:
        problems.append(f"versions lists {numbers}, not [{version.version}]")
    meta = shown["metadata"]
    if (meta.get("adapter_id"), meta.get("version")) != (version.adapter_id, version.version):
        problems.append("stored metadata names another version")
    stored_scale = meta.get("scale_default")
    if stored_scale is not None and not in_range(stored_scale, bounds):
        problems.append(f"stored scale_default {stored_scale!r} outside {list(bounds)}")
    expected = case.expect_scale
    stored_both = (stored_scale, version.scale_default)
    if expected is not UNSET and in_range(expected, bounds) and stored_both != (expected, expected):
        problems.append(f"scale_default {expected!r} stored as {stored_both!r}")
    if any(p.name.startswith(TMP_PREFIX) for p in root.rglob("*")):
        problems.append("temporary files left in the store")
    return problems


def record_changes(version: AdapterVersion, other: AdapterVersion | None) -> list[str]:
    """The fields in which a record read back differs from the one registration returned."""
    if other is None:
        return ["(missing)"]
    mine, theirs = version.model_dump(), other.model_dump()
    return sorted(k for k in mine if not _same(mine[k], theirs.get(k)))


def _same(a: Any, b: Any) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return bool(both_nan or a == b)


# -- a run ----------------------------------------------------------------------------------------


def case_specs(seeds: Sequence[Seed], families: Iterable[str]) -> st.SearchStrategy[Any]:
    names = list(families)  # a family first, then one of its mutations: families get equal shares
    mutations = st.sampled_from(names).flatmap(lambda name: FAMILIES[name])
    return st.tuples(
        st.sampled_from(list(seeds)), st.lists(mutations, min_size=1, max_size=3, unique_by=lambda m: m.label)
    )


def run(
    base: BaseIdentity,
    *,
    cases: int,
    families: Sequence[str] = tuple(FAMILIES),
    seed: int = DEFAULT_SEED,
    workdir: Path | None = None,
) -> Report:
    """``cases`` mutated files of ``families`` registered one by one; the outcome of each."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown fuzz families {unknown}; known: {sorted(FAMILIES)}")
    seeds = make_seeds(base)
    bounds = scale_bounds()
    report = Report(seed=seed, families=list(families))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraswap-fuzz-", dir=workdir) as tmp:
        counter = iter(range(1 << 62))

        @hypothesis_seed(seed)
        @fuzz_settings(cases)
        @given(case_specs(seeds, families))
        def one(spec: tuple[Seed, list[Mutation]]) -> None:
            case = build(spec[0], spec[1], bounds)
            root = Path(tmp) / f"c{next(counter)}"
            try:
                report.results.append(register_case(case, base, root, bounds))
            finally:
                shutil.rmtree(root, ignore_errors=True)

        one()
    report.seconds = time.monotonic() - started
    return report


def run_reproducers(base: BaseIdentity, workdir: Path) -> dict[str, Result]:
    """The outcome of each known defect's fixed reproducer (``reproducers.py``)."""
    bounds = scale_bounds()
    return {
        key: register_case(case, base, workdir / f"repro-{key}", bounds)
        for key, case in reproducer_cases(base).items()
    }


def check_seeds(base: BaseIdentity, workdir: Path) -> list[str]:
    """Every unmutated seed must register and pass every reader: the fuzzer starts from valid files."""
    bounds = scale_bounds()
    problems = []
    for i, seed in enumerate(make_seeds(base)):
        case = Case(seed.name, (), serialise(seed.tensors, seed.metadata), "seed", None, None, (), UNSET)
        result = register_case(case, base, workdir / f"seed{i}", bounds)
        if result.kind != "registered":
            problems.append(f"{seed.name}: {result.kind} {result.detail}")
    return problems
