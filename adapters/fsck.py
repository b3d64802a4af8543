"""Consistency check of an adapter store (``loraswap adapters verify``): what a crash may and may not leave.

The registry promises that a crash at any point leaves the old state or the new one: a version is
visible (its record exists) only once its blob is complete, numbers have no gaps and never name two
contents. ``verify_store`` walks a store (local or S3, through the ``Store`` protocol) and checks
exactly that, opening every live version the way a reader does (``Registry.open``: sha256, header
limits, tensors).

Problems (``Report.ok`` is False):

* ``bad_record`` — a version record that does not parse, or names another id or number;
* ``blob_missing`` / ``sha256_mismatch`` / ``unopenable`` — a live version whose file is absent, was
  modified, or fails a reader's check (e.g. a header over ``max_adapter_header_bytes``);
* ``blob_mismatch`` — the file's own metadata names another id or version than its record;
* ``gap`` — numbers below the highest without a record; ``orphan_tombstone`` — a tombstone without one;
* ``latest`` — ``id`` does not resolve to the highest live version;
* ``bad_index`` — a dedup index entry that does not parse or points at other content;
* ``picture_missing`` / ``picture_mismatch`` — a picture a version's record lists is absent, or its
  bytes fail the sha256 the record gives;
* ``stray_temp`` — a temporary file whose writer is gone (local store); ``unexpected_key`` — a key
  outside the layout; ``unreadable`` — a key the store failed to read;
* with ``known`` (ref → sha256 of versions seen before): ``lost_version`` (gone) and ``reused_number``
  (the number now names other content).

Allowed, only counted: *orphan blobs* and *orphan pictures* (no record names them: a crash between
writing them and the record), *in-flight* temporary files of live writers, and *purged* deleted
versions whose blob was removed. A check beside live writers can miss what they add meanwhile; it
never reports their work as a problem.

``collect_garbage`` (``loraswap adapters gc``) lists the orphan blobs and pictures and, when asked,
removes those older than ``min_age_s``: a registration writes them a moment before its record, so a
young orphan may be one in flight and is always kept. A blob or picture a record names (a deleted
version's included, unless it was purged) is never an orphan.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.errors import AdapterCorrupt, StoreError
from adapters.format import DEFAULT_LIMITS, Limits
from adapters.pictures import picture_key
from adapters.records import VERSION_FILE, AdapterVersion, content_key, parse_listing
from adapters.refs import ID_PATTERN
from adapters.registry import Registry
from adapters.sources import KeyMissing, LocalStore, Store
from adapters.sources.base import Dated
from adapters.sources.breaker import unwrap
from adapters.tempfiles import STALE_AFTER_S
from basemodel.errors import LoraswapError

BLOB_KEY = re.compile(r"^blobs/sha256/(?P<sha>[0-9a-f]{64})\.safetensors$")
CONTENT_KEY = re.compile(r"^adapters/(?P<id>[^/]+)/content/(?P<digest>[0-9a-f]{64})\.json$")
PICTURE_KEY = re.compile(r"^pictures/sha256/[0-9a-f]{64}\.(?:png|jpg|webp)$")
BLOB_PROBLEMS = {"blob_missing", "sha256_mismatch"}


@dataclass(frozen=True)
class Problem:
    kind: str
    key: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "message": self.message}


@dataclass
class Report:
    """What ``verify_store`` found. ``versions`` maps every readable ref to its blob's sha256."""

    store: str
    adapters: int = 0
    live: int = 0
    deleted: int = 0
    blobs: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    orphan_blobs: list[str] = field(default_factory=list)
    orphan_pictures: list[str] = field(default_factory=list)  # their keys
    in_flight_temps: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> dict[str, int]:
        """Problem kind → count."""
        return dict(Counter(p.kind for p in self.problems))

    def add(self, kind: str, key: str, message: str) -> None:
        self.problems.append(Problem(kind, key, message))

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "adapters": self.adapters,
            "live_versions": self.live,
            "deleted_versions": self.deleted,
            "blobs": self.blobs,
            "orphan_blobs": self.orphan_blobs,
            "orphan_pictures": self.orphan_pictures,
            "in_flight_temps": self.in_flight_temps,
            "purged": self.purged,
            "problem_kinds": self.kinds(),
            "problems": [p.to_dict() for p in self.problems],
        }


def verify_store(
    store: Store, *, limits: Limits = DEFAULT_LIMITS, known: Mapping[str, str] | None = None
) -> Report:
    """Check every key of ``store`` (one listing, then a read per record and per live blob)."""
    registry = Registry(store, limits=limits)
    report = Report(store.uri)
    keys = store.list()
    blobs = {m["sha"] for m in map(BLOB_KEY.match, keys) if m}
    report.blobs = len(blobs)
    for key in keys:
        if not _in_layout(key):
            report.add("unexpected_key", key, "a key outside the registry's layout")
    records: dict[tuple[str, int], AdapterVersion] = {}
    listing = parse_listing(keys)
    for adapter_id, (versions, deleted) in sorted(listing.items()):
        if ID_PATTERN.match(adapter_id) is None or ".." in adapter_id:
            continue  # reported as unexpected keys
        report.adapters += 1
        _check_numbers(report, adapter_id, versions, deleted)
        for number in sorted(versions):
            record = _check_version(report, registry, adapter_id, number, number in deleted, blobs)
            if record is not None:
                records[(adapter_id, number)] = record
        _check_latest(report, registry, adapter_id, versions - deleted)
    for match in filter(None, map(CONTENT_KEY.match, keys)):
        listed = listing.get(match["id"], (set(), set()))[0]
        _check_index(report, store, match["id"], match["digest"], records, listed)
    referenced = {r.sha256 for r in records.values()}
    report.orphan_blobs = sorted(blobs - referenced)
    pictures = {key for key in keys if PICTURE_KEY.match(key)}
    named = _check_pictures(report, store, records.values(), pictures)
    report.orphan_pictures = sorted(pictures - named)
    if known:
        _check_known(report, known)
    if isinstance(store, LocalStore):
        _check_temps(report, store)
    return report


def _check_pictures(report: Report, store: Store, records: Any, present: set[str]) -> set[str]:
    """Every picture a record lists is there with the bytes its sha256 names; the keys named."""
    named: set[str] = set()
    for record in records:
        for picture in record.pictures:
            key = picture_key(picture)
            named.add(key)
            if key not in present:
                report.add("picture_missing", key, f"{record.ref}: picture {picture.name!r} is missing")
                continue
            try:
                data = store.get(key)
            except KeyMissing:
                report.add("picture_missing", key, f"{record.ref}: picture {picture.name!r} is missing")
                continue
            except StoreError as exc:
                report.add("unreadable", key, exc.message)
                continue
            if hashlib.sha256(data).hexdigest() != picture.sha256:
                report.add("picture_mismatch", key, f"{record.ref}: picture {picture.name!r} was modified")
    return named


def _in_layout(key: str) -> bool:
    if BLOB_KEY.match(key) or CONTENT_KEY.match(key) or PICTURE_KEY.match(key):
        return True
    parts = key.split("/")
    return (
        len(parts) == 4
        and parts[0] == "adapters"
        and ID_PATTERN.match(parts[1]) is not None
        and ".." not in parts[1]
        and parts[2] in ("versions", "deleted")
        and VERSION_FILE.match(parts[3]) is not None
    )


def _check_numbers(report: Report, adapter_id: str, versions: set[int], deleted: set[int]) -> None:
    report.live += len(versions - deleted)
    report.deleted += len(versions & deleted)
    missing = sorted(set(range(1, max(versions, default=0) + 1)) - versions)
    if missing:
        report.add(
            "gap",
            f"adapters/{adapter_id}/versions/",
            f"{adapter_id}: no record for version(s) {_numbers(missing)} below v{max(versions)}",
        )
    for number in sorted(deleted - versions):
        report.add(
            "orphan_tombstone",
            f"adapters/{adapter_id}/deleted/{number}.json",
            f"{adapter_id}@{number} has a tombstone but no record",
        )


def _check_version(
    report: Report, registry: Registry, adapter_id: str, number: int, deleted: bool, blobs: set[str]
) -> AdapterVersion | None:
    key = f"adapters/{adapter_id}/versions/{number}.json"
    try:
        record = registry.record(adapter_id, number, deleted=deleted)
    except StoreError as exc:
        report.add("unreadable", key, exc.message)
        return None
    except LoraswapError as exc:  # unreadable JSON, another id/number, or gone since the listing
        report.add("bad_record", key, exc.message)
        return None
    report.versions[record.ref] = record.sha256
    if deleted:
        if record.sha256 not in blobs:
            report.purged.append(record.ref)
        return record
    try:
        loaded = registry.open(record)
    except LoraswapError as exc:
        reason = exc.detail.get("reason") if isinstance(exc, AdapterCorrupt) else None
        kind = reason if reason in BLOB_PROBLEMS else "unopenable"
        report.add(str(kind), f"blobs/sha256/{record.sha256}.safetensors", f"{record.ref}: {exc.message}")
        return record
    named = (loaded.metadata.adapter_id, loaded.metadata.version)
    if named != (adapter_id, number):
        report.add(
            "blob_mismatch",
            key,
            f"{record.ref} points at the file of {named[0]}@{named[1]} (sha256 {record.sha256[:12]})",
        )
    return record


def _check_latest(report: Report, registry: Registry, adapter_id: str, live: set[int]) -> None:
    if not live:
        return
    try:
        latest = registry.resolve(adapter_id).version
    except LoraswapError as exc:
        report.add("latest", f"adapters/{adapter_id}/", f"{adapter_id} does not resolve: {exc.message}")
        return
    if latest != max(live):
        report.add(
            "latest", f"adapters/{adapter_id}/", f"{adapter_id} resolves to v{latest}, not v{max(live)}"
        )


def _check_index(
    report: Report,
    store: Store,
    adapter_id: str,
    digest: str,
    records: dict[tuple[str, int], AdapterVersion],
    listed: set[int],
) -> None:
    key = content_key(adapter_id, digest)
    try:
        number = int(json.loads(store.get(key))["version"])
    except (KeyMissing, StoreError) as exc:
        report.add("unreadable", key, f"cannot read the index entry: {exc}")
        return
    except (ValueError, KeyError, TypeError):
        report.add("bad_index", key, "the index entry does not parse")
        return
    record = records.get((adapter_id, number))
    if record is None and number in listed:
        return  # its record is unreadable: reported once, as bad_record
    if record is None:
        report.add("bad_index", key, f"points at {adapter_id}@{number}, which has no readable record")
    elif record.content_sha256 != digest:
        report.add("bad_index", key, f"points at {adapter_id}@{number}, whose content differs")


def _check_known(report: Report, known: Mapping[str, str]) -> None:
    for ref, sha in sorted(known.items()):
        found = report.versions.get(ref)
        if found is None:
            report.add("lost_version", ref, f"{ref} was registered (sha256 {sha[:12]}) and is gone")
        elif found != sha:
            report.add("reused_number", ref, f"{ref} named sha256 {sha[:12]}, now {found[:12]}")


def _check_temps(report: Report, store: LocalStore) -> None:
    for temp in store.temp_files():
        name = temp.path.relative_to(store.root).as_posix()
        if temp.stale:
            report.add("stray_temp", name, "a temporary file left by a writer that is gone")
        else:
            report.in_flight_temps.append(name)


def _numbers(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" … ({len(numbers)} in all)" if len(numbers) > limit else "")


@dataclass(frozen=True)
class Orphan:
    key: str
    age_s: float | None  # None: the store cannot tell (the blob is then never removed)
    removable: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "age_s": self.age_s, "removable": self.removable}


@dataclass
class Collection:
    """What ``collect_garbage`` found and, with ``apply``, removed."""

    store: str
    applied: bool
    min_age_s: float
    orphans: list[Orphan] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "applied": self.applied,
            "min_age_s": self.min_age_s,
            "orphans": [o.to_dict() for o in self.orphans],
            "removed": self.removed,
        }


def collect_garbage(
    store: Store,
    *,
    apply: bool = False,
    min_age_s: float = STALE_AFTER_S,
    limits: Limits = DEFAULT_LIMITS,
    now: float | None = None,
) -> Collection:
    """The store's orphan blobs and pictures (``verify_store``'s), each with its age; with ``apply``,
    remove those at least ``min_age_s`` old. Removing one changes nothing a reader can see: no record
    names it."""
    report = verify_store(store, limits=limits)
    dated = unwrap(store)
    clock = time.time() if now is None else now
    found = Collection(store.uri, apply, min_age_s)
    orphan_keys = [f"blobs/sha256/{sha}.safetensors" for sha in report.orphan_blobs]
    for key in [*orphan_keys, *report.orphan_pictures]:
        try:
            age = clock - dated.modified(key) if isinstance(dated, Dated) else None
        except KeyMissing:
            continue  # removed meanwhile
        found.orphans.append(Orphan(key, age, age is not None and age >= min_age_s))
    if apply:
        for orphan in found.orphans:
            if orphan.removable:
                store.delete(orphan.key)
                found.removed.append(orphan.key)
    return found
