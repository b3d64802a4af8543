"""Defects the fuzzers are known to find, recognised by the failures they cause.

Each entry says where it comes from (issue 12's list, or found by these fuzzers) and which branch
fixes it; ``FIXED`` names those whose fix is in this tree. The bounded tests ignore failures of unfixed
known defects in their family checks and run one strict-xfail test per unfixed defect, so a fix shows
up as an XPASS: add its key to ``FIXED`` then. The full runs label every failure with its defect (or
``unknown``), which is what docs/reliability.md reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

# (kind, detail) of one failure: for adapters kind is crash / stored_invalid / accepted_hostile /
# refused_valid; for the API it is the check that failed (not_a_server_error …).
Matcher = Callable[[str, str], bool]

# Keys of the defects whose fix is merged into this tree.
FIXED: frozenset[str] = frozenset(
    {
        "deep-json",
        "metadata-size",
        "scale-default",
        "alpha-bound",
        "dtype-unhashable",
        "pickle-lookalike",
        "non-finite-metadata",
        "surrogate-metadata",
        "scale-tags",
        "bucket-name",
        "lax-coercion",
        "openapi-statuses",
    }
)


@dataclass(frozen=True)
class KnownDefect:
    key: str
    title: str
    source: str  # "issue 12 defect N" or "fuzz: new"
    fixed_on: str  # the branch that fixes it
    matches: Matcher

    @property
    def fixed(self) -> bool:
        return self.key in FIXED

    @property
    def reason(self) -> str:
        return f"{self.source}: {self.title} (fixed on {self.fixed_on})"


def _kind_and(kind: str, *needles: str) -> Matcher:
    return lambda k, detail: k == kind and all(n in detail for n in needles)


ADAPTER_DEFECTS = (
    KnownDefect(
        "deep-json",
        "deeply nested JSON in a header or in metadata raises RecursionError (or pydantic's "
        "'Maximum serialization depth exceeded' when the metadata is written back)",
        "issue 12 defect 3",
        "wip/input",
        lambda kind, detail: kind == "crash" and ("RecursionError" in detail or "depth exceeded" in detail),
    ),
    KnownDefect(
        "metadata-size",
        "metadata within the input limits makes a stored header exceed the header cap",
        "issue 12 defect 4",
        "wip/input",
        _kind_and("stored_invalid", "AdapterTooLarge"),
    ),
    KnownDefect(
        "scale-default",
        "scale_default outside the request limits or non-finite is stored (NaN/inf as null)",
        "issue 12 defect 5",
        "wip/input",
        _kind_and("stored_invalid", "scale_default"),
    ),
    KnownDefect(
        "alpha-bound",
        "alpha <= 0 or absurdly large (alpha/rank > 1e3) is accepted",
        "issue 12 (lower severity)",
        "wip/input",
        _kind_and("accepted_hostile", "alpha"),
    ),
    KnownDefect(
        "dtype-unhashable",
        'a header entry whose "dtype" is a list or an object raises TypeError (unhashable)',
        "fuzz: new",
        "wip/input (adapters/format.py)",
        _kind_and("crash", "unhashable type"),
    ),
    KnownDefect(
        "pickle-lookalike",
        "a valid file whose header length starts with bytes 0x80 0x02..0x05 is refused as pickle",
        "fuzz: new",
        "wip/input (adapters/format.py)",
        _kind_and("refused_valid", "adapter_unsafe_format/pickle"),
    ),
    KnownDefect(
        "non-finite-metadata",
        "NaN/inf in a metadata float (alpha, evaluation.metrics …) is written as null; the stored "
        "record or metadata no longer validates",
        "fuzz: new",
        "wip/input (adapters/metadata.py)",
        _kind_and("stored_invalid", "Input should be a valid number"),
    ),
    KnownDefect(
        "surrogate-metadata",
        "a lone surrogate (JSON '\\ud800') in a metadata string makes writing the header fail",
        "fuzz: new",
        "wip/input (adapters/metadata.py)",
        _kind_and("crash", "surrogates not allowed"),
    ),
)


def classify(defects: Iterable[KnownDefect], kind: str, detail: str) -> KnownDefect | None:
    """The known defect a failure is a symptom of, or None."""
    return next((d for d in defects if d.matches(kind, detail)), None)


def unfixed(defects: Iterable[KnownDefect]) -> list[KnownDefect]:
    return [d for d in defects if not d.fixed]


def _labelled(*prefixes: str) -> Matcher:
    """A failure of a hostile case whose label starts with one of ``prefixes`` — its status or its 5xx;
    an undocumented status is ``openapi-statuses`` whatever the case."""
    starts = tuple(f"hostile:{p}" for p in prefixes)
    return lambda check, detail: check != "status_code_conformance" and detail.startswith(starts)


def _upload(defect: KnownDefect) -> KnownDefect:
    """An adapter defect as the API fuzzer sees it: its reproducer uploaded (or its own hostile cases)."""
    own = {"deep-json": ("deep:",), "metadata-size": ("metadata-size:",), "scale-default": ("scale:",)}
    return replace(defect, matches=_labelled(f"upload:{defect.key} ", *own.get(defect.key, ())))


# The API fuzzer's failures are matched on (check, "<source> <operation> <failure>"), most specific first.
API_DEFECTS = (
    *(_upload(d) for d in ADAPTER_DEFECTS),
    KnownDefect(
        "scale-tags",
        "A1111 prompt tags <lora:id:nan|inf|99> bypass the scale limit (200, scale null)",
        "issue 12 defect 6",
        "wip/input",
        _labelled("tag:"),
    ),
    KnownDefect(
        "bucket-name",
        "an s3:// source whose bucket is not a valid bucket name is reported as a store outage (503)",
        "issue 12 defect 7",
        "wip/store",
        _labelled("bucket:"),
    ),
    KnownDefect(
        "lax-coercion",
        'numbers and booleans are coerced ("steps": "1", "steps": true, "seed": 1.0 accepted)',
        "issue 12 (lower severity)",
        "wip/input",
        lambda check, detail: check == "negative_data_rejection" or _labelled("coercion:")(check, detail),
    ),
    KnownDefect(
        "openapi-statuses",
        "the OpenAPI document lists only 200/400 (or 201); the 4xx/5xx the routes return are undocumented",
        "issue 12 defect 8",
        "wip/input",
        lambda check, detail: check == "status_code_conformance",
    ),
)
