"""The adapter registry: ids with immutable, numbered versions over a ``Store``.

Registration reads the file safely, checks it against the base model, normalises it to the
canonical layout and stores it content-addressed (``blobs/sha256/<sha>.safetensors``) *before* the
version record ``adapters/<id>/versions/<n>.json`` is created with an atomic create-if-absent. The
record is what makes a version visible, so a crash leaves at most an unreferenced blob. Two
registrations racing for the same number: one create wins, the other re-lists and takes the next
number (or returns the winner when the content is identical). Numbers are never reused: deletion
writes a tombstone and the record stays.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapters.errors import AdapterCorrupt, AdapterInvalid, AdapterNotFound, StoreError
from adapters.format import (
    DEFAULT_LIMITS,
    Limits,
    check_readable,
    load_source,
    read_header_only,
    write_adapter,
)
from adapters.identity import BaseIdentity
from adapters.metadata import AdapterMetadata, coerce_metadata, parse_header_metadata
from adapters.opening import HeaderMemo, LoadedAdapter, OpenChecks, open_buffer, open_file
from adapters.pictures import (
    CheckedPicture,
    Picture,
    PictureLimits,
    PictureUpload,
    check_pictures,
    picture_key,
)
from adapters.prepare import Prepared, prepare
from adapters.readahead import OpenFile
from adapters.records import (
    AdapterSummary,
    AdapterVersion,
    adapter_prefix,
    blob_key,
    content_key,
    parse_listing,
    tombstone_key,
    version_key,
)
from adapters.refs import AdapterRef, parse_ref, validate_id
from adapters.sources import KeyMissing, LocalStore, Store, open_settings_store
from adapters.sources.breaker import unwrap
from adapters.views import as_buffer, blake3_hex
from basemodel.errors import ConfigError, LoraswapError

if TYPE_CHECKING:
    from basemodel.settings import Settings

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 64
HEADER_PROBE = 256 << 10  # first read of a blob's header; most headers fit


def check_storable(data: bytes, record: AdapterVersion, limits: Limits) -> None:
    """The file and the record of a new version pass every check their readers apply (413/422)."""
    check_readable(data, limits)
    try:
        AdapterVersion.model_validate_json(record.record_json())
    except ValueError as exc:
        raise AdapterInvalid(
            f"the version record would not read back: {exc}", reason="unreadable_record"
        ) from None


class Registry:
    """Register, resolve, open, list and delete adapters in one store.

    ``base`` is needed to register (compatibility check, kohya name mapping) and, when given, to
    ``open`` (architecture check). Listing, resolving and deleting work without it.
    """

    def __init__(
        self,
        store: Store,
        base: BaseIdentity | None = None,
        *,
        strict_base: bool = False,
        max_rank: int = 256,
        limits: Limits = DEFAULT_LIMITS,
        picture_limits: PictureLimits | None = None,
    ) -> None:
        self.store = store
        self.base = base
        self.strict_base = strict_base
        self.max_rank = max_rank
        self.limits = limits
        self.picture_limits = picture_limits or PictureLimits()
        self._headers = HeaderMemo()  # headers that passed an open_file's checks (adapters.opening)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        base: BaseIdentity | None = None,
        *,
        store: Store | None = None,
        sweep: bool = True,
    ) -> Registry:
        """A registry over ``store`` or, by default, the settings' store with their timeouts; ``sweep``
        first removes what killed writers left."""
        if store is None:
            store = open_settings_store(settings)
        limits = Limits(
            max_bytes=settings.max_adapter_bytes, max_header_bytes=settings.max_adapter_header_bytes
        )
        pictures = PictureLimits(
            max_count=settings.max_pictures,
            max_bytes=settings.max_picture_bytes,
            max_pixels=settings.max_picture_pixels,
        )
        registry = cls(
            store,
            base,
            strict_base=settings.strict_base,
            max_rank=settings.max_lora_rank,
            limits=limits,
            picture_limits=pictures,
        )
        if sweep:
            registry.sweep_temps()
        return registry

    def sweep_temps(self) -> int:
        """Remove temporary files of writers that are gone (a local store; S3 writes have none)."""
        local = unwrap(self.store)
        if not isinstance(local, LocalStore):
            return 0
        removed = local.sweep_temps()
        for path in removed:
            log.warning("removed %s, left by a writer that was killed mid-write", path)
        return len(removed)

    # -- registration -------------------------------------------------------------------------

    def register(
        self,
        source: bytes | Path,
        adapter_id: str,
        metadata: dict[str, Any] | AdapterMetadata | None = None,
        *,
        scale_default: float | None = None,
        strict_base: bool | None = None,
        pictures: Sequence[PictureUpload] = (),
    ) -> AdapterVersion:
        """Validate, normalise and store ``source`` as the next version of ``adapter_id``.

        Identical content (same canonical tensors, metadata and pictures) returns the existing live
        version. ``pictures`` (previews, a loss curve, sample grids) are checked and stored with it.
        """
        version, _ = self.register_outcome(
            source,
            adapter_id,
            metadata,
            scale_default=scale_default,
            strict_base=strict_base,
            pictures=pictures,
        )
        return version

    def register_outcome(
        self,
        source: bytes | Path,
        adapter_id: str,
        metadata: dict[str, Any] | AdapterMetadata | None = None,
        *,
        scale_default: float | None = None,
        strict_base: bool | None = None,
        pictures: Sequence[PictureUpload] = (),
    ) -> tuple[AdapterVersion, bool]:
        """``register``, also saying whether this call created the version (False: identical content)."""
        validate_id(adapter_id)
        base = self._require_base()
        checked = check_pictures(pictures, self.picture_limits)
        user = coerce_metadata(metadata)
        prepared = prepare(
            load_source(source, self.limits),
            base,
            user,
            max_rank=self.max_rank,
            limits=self.limits,
            strict_base=self.strict_base if strict_base is None else strict_base,
            scale_default=scale_default,
        )
        for _ in range(MAX_ATTEMPTS):
            versions, deleted = self._state(adapter_id)
            listed = tuple(c.picture for c in checked)
            existing = self._find_content(adapter_id, prepared.digest, versions - deleted, listed)
            if existing is not None:
                return existing, False
            created = self._try_create(adapter_id, max(versions, default=0) + 1, prepared, checked)
            if created is not None:
                return created, True
        raise StoreError(
            f"could not allocate a version of {adapter_id!r} after {MAX_ATTEMPTS} attempts",
            reason="contention",
        )

    def _try_create(
        self, adapter_id: str, number: int, prepared: Prepared, pictures: Sequence[CheckedPicture] = ()
    ) -> AdapterVersion | None:
        created_at = datetime.now(UTC)
        meta = prepared.metadata.model_copy(
            update={"adapter_id": adapter_id, "version": number, "created_at": created_at}
        )
        data = write_adapter(None, prepared.tensors, meta, self.base.architecture if self.base else None)
        sha = hashlib.sha256(data).hexdigest()  # the content id, computed once (A1111/kohya name files by it)
        record = AdapterVersion.from_metadata(
            meta,
            sha256=sha,
            content_sha256=prepared.digest,
            size=len(data),
            pictures=tuple(p.picture for p in pictures),
            blake3=blake3_hex(data),
        )
        check_storable(data, record, self.limits)  # nothing is written that a reader would refuse
        for picture in pictures:  # content-addressed and possibly shared: never deleted on a lost race
            self.store.create(picture_key(picture.picture), picture.data)
        wrote_blob = self.store.create(blob_key(sha), data)
        if self.store.create(version_key(adapter_id, number), record.record_json()):
            self.store.put(content_key(adapter_id, prepared.digest), json.dumps({"version": number}).encode())
            log.info("registered %s (%d bytes, sha256 %s)", record.ref, len(data), sha[:12])
            return record
        if wrote_blob:  # lost the race for this number; our blob names it, so nobody else uses it
            self.store.delete(blob_key(sha))
        return None

    def _find_content(
        self, adapter_id: str, digest: str, live: set[int], pictures: tuple[Picture, ...] = ()
    ) -> AdapterVersion | None:
        """A live version with this content and pictures: via the dedup index, else the latest version.

        The second check covers a concurrent identical registration whose record exists but whose
        index entry is not written yet.
        """
        candidates = []
        try:
            pointer = json.loads(self.store.get(content_key(adapter_id, digest)))
            candidates.append(int(pointer["version"]))
        except KeyMissing:
            pass
        except (ValueError, KeyError, TypeError):
            pass  # a damaged index entry only costs deduplication
        if live:
            candidates.append(max(live))
        for number in candidates:
            if number in live:
                version = self._record(adapter_id, number)
                if version.content_sha256 == digest and version.pictures == pictures:
                    return version
        return None

    # -- lookup -------------------------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterVersion:
        """``id`` / ``id@latest`` → latest live version; ``id@3`` → version 3 unless deleted."""
        parsed = parse_ref(ref)
        versions, deleted = self._state(parsed.adapter_id)
        return self._record(parsed.adapter_id, self._pick(parsed, versions, deleted))

    def state(self, adapter_id: str) -> tuple[set[int], set[int]]:
        """(every version number, the deleted ones) of ``adapter_id``: one listing, no record read."""
        return self._state(validate_id(adapter_id))

    def pick(self, ref: AdapterRef, versions: set[int], deleted: set[int]) -> int:
        """The version number ``ref`` selects in a ``state``; the not-found errors ``resolve`` raises."""
        return self._pick(ref, versions, deleted)

    def latest_version(self, adapter_id: str) -> int | None:
        """Latest live version number (one listing, no record read): cheap change detection."""
        versions, deleted = self._state(validate_id(adapter_id))
        return max(versions - deleted, default=None)

    def revision(self, adapter_id: str) -> str:
        """Token that changes whenever a version of ``adapter_id`` is added or deleted (one listing)."""
        versions, deleted = self._state(validate_id(adapter_id))
        return f"{max(versions, default=0)}:{len(versions)}:{len(deleted)}:{max(deleted, default=0)}"

    def record(self, adapter_id: str, number: int, *, deleted: bool = False) -> AdapterVersion:
        """The stored record of ``adapter_id`` version ``number`` (no listing; deleted or not)."""
        return self._record(validate_id(adapter_id), number, deleted=deleted)

    def versions(self, adapter_id: str, *, include_deleted: bool = False) -> list[AdapterVersion]:
        versions, deleted = self._state(validate_id(adapter_id))
        numbers = sorted(versions if include_deleted else versions - deleted)
        return [self._record(adapter_id, n, deleted=n in deleted) for n in numbers]

    def list(self, *, include_deleted: bool = False) -> list[AdapterSummary]:
        """Every adapter id with its latest live version (one listing + one read per id)."""
        summaries = []
        for adapter_id, (versions, deleted) in sorted(parse_listing(self.store.list("adapters/")).items()):
            live = versions - deleted
            if not live and not include_deleted:
                continue
            latest = self._record(adapter_id, max(live)) if live else None
            summaries.append(
                AdapterSummary(
                    adapter_id=adapter_id,
                    latest=latest,
                    versions=len(versions),
                    deleted=len(deleted & versions),
                )
            )
        return summaries

    def open(self, version: AdapterVersion | str) -> LoadedAdapter:
        """Read a version's blob, verify its sha256 and contents, return tensors + metadata."""
        if isinstance(version, str):
            version = self.resolve(version)
        return self.open_data(version, self.read_blob(version))

    def read_blob(self, version: AdapterVersion) -> bytes:
        """The raw file of ``version`` from the store (not yet verified)."""
        try:
            return self.store.get(blob_key(version.sha256))
        except KeyMissing:
            raise AdapterCorrupt(
                f"the file of {version.ref} is missing from the store", reason="blob_missing"
            ) from None

    def read_picture(self, version: AdapterVersion, index: int) -> tuple[Picture, bytes]:
        """Picture ``index`` of ``version`` and its bytes, checked against the sha256 its record names."""
        if not 0 <= index < len(version.pictures):
            raise AdapterNotFound(
                f"{version.ref} has no picture {index} (it has {len(version.pictures)})",
                reason="unknown_picture",
                detail={"pictures": len(version.pictures)},
            )
        picture = version.pictures[index]
        try:
            data = self.store.get(picture_key(picture))
        except KeyMissing:
            raise AdapterCorrupt(
                f"picture {index} of {version.ref} is missing from the store", reason="picture_missing"
            ) from None
        if hashlib.sha256(data).hexdigest() != picture.sha256:
            raise AdapterCorrupt(
                f"picture {index} of {version.ref} was modified in the store", reason="sha256_mismatch"
            )
        return picture, data

    def read_metadata(self, version: AdapterVersion) -> AdapterMetadata:
        """The ``loraswap`` metadata from the blob's header, reading only the header (no sha256 check)."""
        key = blob_key(version.sha256)
        try:
            head = self.store.get_range(key, 0, HEADER_PROBE)
            if len(head) >= 8:
                end = 8 + int.from_bytes(head[:8], "little")
                if self.limits.max_header_bytes >= end - 8 > len(head) - 8:
                    head += self.store.get_range(key, len(head), end)
        except KeyMissing:
            raise AdapterCorrupt(
                f"the file of {version.ref} is missing from the store", reason="blob_missing"
            ) from None
        try:
            _, header = read_header_only(head, self.limits)
        except LoraswapError as exc:
            raise AdapterCorrupt(
                f"the stored header of {version.ref} is unreadable: {exc.message}", reason="bad_header"
            ) from None
        return parse_header_metadata(header) or AdapterMetadata()

    def open_data(
        self, version: AdapterVersion, data: bytes | torch.Tensor, *, verify: bool = True
    ) -> LoadedAdapter:
        """Verify and parse ``data`` (bytes, or a ``uint8`` buffer) as the file of ``version``, in one
        pass: the hash, the header, the shapes (from the header, on views of the buffer: nothing is
        copied), then every value; the tensors are views of ``data`` (``adapters.opening``).

        ``verify=False`` is for callers that verified these exact bytes before in this process (a cache
        tier that checks the file's size and mtime); every other check still runs.
        """
        return open_buffer(version, as_buffer(data), self._open_checks(), verify=verify)

    def open_file(
        self,
        version: AdapterVersion,
        file: OpenFile,
        *,
        verify: bool = True,
        values: bool = True,
        meanwhile: Callable[[dict[str, torch.Tensor]], object] | None = None,
    ) -> LoadedAdapter:
        """``open_data`` for a local file opened by ``adapters.readahead`` and not read yet: the read
        runs on a reader thread while the header is parsed; the checks and the result are the same
        (``values=False``: bytes verified and checked before in this process; ``meanwhile``: work on
        the views while the bytes arrive; ``opening.open_file``)."""
        return open_file(
            version,
            file,
            self._open_checks(),
            verify=verify,
            values=values,
            memo=self._headers,
            meanwhile=meanwhile,
        )

    def forget_header(self, sha256: str) -> None:
        """Drop a remembered checked header (``open_file``'s memo): the next open parses it again."""
        self._headers.forget(sha256)

    def _open_checks(self) -> OpenChecks:
        return OpenChecks(self.base, self.strict_base, self.limits.max_header_bytes)

    # -- deletion -----------------------------------------------------------------------------

    def delete(self, ref: str, *, purge: bool = False) -> builtins.list[AdapterVersion]:
        """Tombstone ``id@N`` / ``id@latest`` (one version) or ``id`` (every live version).

        Numbers are never reused. ``purge`` also removes the deleted versions' blobs.
        """
        parsed = parse_ref(ref)
        versions, deleted = self._state(parsed.adapter_id)
        if parsed.explicit:
            targets = [self._pick(parsed, versions, deleted)]
        else:
            targets = sorted(versions - deleted)
            if not targets:
                self._pick(parsed, versions, deleted)  # raises the right not-found error
        stamp = json.dumps({"deleted_at": datetime.now(UTC).isoformat()}).encode()
        removed = []
        for number in targets:
            record = self._record(parsed.adapter_id, number)
            self.store.put(tombstone_key(parsed.adapter_id, number), stamp)
            if purge:
                self.store.delete(blob_key(record.sha256))
            removed.append(record.model_copy(update={"deleted": True}))
        return removed

    # -- internals ----------------------------------------------------------------------------

    def _require_base(self) -> BaseIdentity:
        if self.base is None:
            raise ConfigError(
                "registering an adapter needs the base model identity",
                hint="Create the Registry with base=BaseIdentity.from_base_model(...) or pass --base-model.",
            )
        return self.base

    def _state(self, adapter_id: str) -> tuple[set[int], set[int]]:
        listing = parse_listing(self.store.list(adapter_prefix(adapter_id)))
        return listing.get(adapter_id, (set(), set()))

    def _pick(self, ref: AdapterRef, versions: set[int], deleted: set[int]) -> int:
        if not versions:
            raise AdapterNotFound(f"adapter {ref.adapter_id!r} not found", reason="unknown_id")
        if ref.version is None:
            live = versions - deleted
            if not live:
                raise AdapterNotFound(
                    f"every version of adapter {ref.adapter_id!r} is deleted", reason="deleted"
                )
            return max(live)
        if ref.version not in versions:
            raise AdapterNotFound(
                f"adapter {ref.adapter_id!r} has no version {ref.version}",
                reason="unknown_version",
                detail={"latest": max(versions)},
            )
        if ref.version in deleted:
            raise AdapterNotFound(f"adapter version {ref} is deleted", reason="deleted")
        return ref.version

    def _record(self, adapter_id: str, number: int, *, deleted: bool = False) -> AdapterVersion:
        try:
            raw = self.store.get(version_key(adapter_id, number))
            record = AdapterVersion.model_validate_json(raw)
        except KeyMissing:
            raise AdapterNotFound(
                f"adapter {adapter_id}@{number} not found", reason="unknown_version"
            ) from None
        except ValueError as exc:
            raise AdapterCorrupt(
                f"the record of {adapter_id}@{number} is unreadable: {exc}", reason="bad_record"
            ) from None
        if record.adapter_id != adapter_id or record.version != number:
            raise AdapterCorrupt(
                f"the record of {adapter_id}@{number} names {record.ref}", reason="bad_record"
            )
        return record.model_copy(update={"deleted": deleted}) if deleted else record
