"""What the registry stores about a version, and the store layout (every key in one place).

Store layout (keys under the store root / S3 prefix)::

    blobs/sha256/<sha256>.safetensors        normalised adapter file, content-addressed
    pictures/sha256/<sha256>.<png|jpg|webp>  a picture a version carries (adapters/pictures.py)
    adapters/<id>/versions/<n>.json          version record (AdapterVersion JSON), created atomically
    adapters/<id>/deleted/<n>.json           tombstone: version n is deleted
    adapters/<id>/content/<digest>.json      dedup index: content digest → version number
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from adapters.metadata import AdapterKind, AdapterMetadata, BaseModelInfo, SourceFormat, TensorDType
from adapters.pictures import Picture

VERSION_FILE = re.compile(r"^(?P<n>[1-9][0-9]{0,8})\.json$")


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}.safetensors"


def adapter_prefix(adapter_id: str) -> str:
    return f"adapters/{adapter_id}/"


def version_key(adapter_id: str, version: int) -> str:
    return f"adapters/{adapter_id}/versions/{version}.json"


def tombstone_key(adapter_id: str, version: int) -> str:
    return f"adapters/{adapter_id}/deleted/{version}.json"


def content_key(adapter_id: str, digest: str) -> str:
    return f"adapters/{adapter_id}/content/{digest}.json"


def parse_listing(keys: list[str]) -> dict[str, tuple[set[int], set[int]]]:
    """``adapters/…`` keys → adapter id → (version numbers, deleted version numbers)."""
    state: dict[str, tuple[set[int], set[int]]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "adapters" or parts[2] not in ("versions", "deleted"):
            continue
        match = VERSION_FILE.match(parts[3])
        if match is None:
            continue
        versions, deleted = state.setdefault(parts[1], (set(), set()))
        (versions if parts[2] == "versions" else deleted).add(int(match["n"]))
    return state


class AdapterVersion(BaseModel):
    """One immutable registered version (the stored record, plus ``deleted`` from its tombstone)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    adapter_id: str
    version: int = Field(ge=1)
    sha256: str
    content_sha256: str
    size: int
    blake3: str | None = None  # BLAKE3 of the same file: what each load verifies (None: older records)
    created_at: datetime
    base_model: BaseModelInfo
    base_model_match: bool | None = None
    source_format: SourceFormat
    kind: AdapterKind = "lora"
    rank: int
    alpha: float
    dtype: TensorDType
    num_modules: int
    components: list[str]
    scale_default: float | None = None
    title: str | None = None
    pictures: tuple[Picture, ...] = ()
    deleted: bool = False

    @property
    def ref(self) -> str:
        return f"{self.adapter_id}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for APIs and the CLI (includes ``ref``)."""
        return {"ref": self.ref, **self.model_dump(mode="json")}

    @classmethod
    def from_metadata(
        cls,
        meta: AdapterMetadata,
        *,
        sha256: str,
        content_sha256: str,
        size: int,
        pictures: tuple[Picture, ...] = (),
        blake3: str | None = None,
    ) -> AdapterVersion:
        """The record of a file just written with complete registry metadata."""
        if not (
            meta.adapter_id and meta.version and meta.created_at and meta.base_model and meta.source_format
        ):
            raise ValueError("metadata lacks the registry fields (id, version, created_at, base, source)")
        if meta.rank is None or meta.alpha is None or meta.dtype is None:
            raise ValueError("metadata lacks the tensor summary (rank, alpha, dtype)")
        return cls(
            adapter_id=meta.adapter_id,
            version=meta.version,
            sha256=sha256,
            content_sha256=content_sha256,
            size=size,
            blake3=blake3,
            created_at=meta.created_at,
            base_model=meta.base_model,
            base_model_match=meta.base_model_match,
            source_format=meta.source_format,
            kind=meta.kind or "lora",
            rank=meta.rank,
            alpha=meta.alpha,
            dtype=meta.dtype,
            num_modules=len(meta.target_modules),
            components=sorted({m.split(".", 1)[0] for m in meta.target_modules}),
            scale_default=meta.scale_default,
            title=meta.title,
            pictures=pictures,
        )

    def record_json(self) -> bytes:
        # A LoRA's record omits its kind, a version without pictures its empty list, a record without a
        # BLAKE3 (read from an older release) its hash: byte for byte what earlier releases wrote.
        exclude = {"deleted", "kind"} if self.kind == "lora" else {"deleted"}
        if not self.pictures:
            exclude.add("pictures")
        if self.blake3 is None:
            exclude.add("blake3")
        return self.model_dump_json(exclude=exclude).encode()


class AdapterSummary(BaseModel):
    """One adapter id in ``Registry.list()``: its latest live version and version counts."""

    model_config = ConfigDict(frozen=True)

    adapter_id: str
    latest: AdapterVersion | None
    versions: int
    deleted: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_id": self.adapter_id,
            "latest": self.latest.to_dict() if self.latest else None,
            "versions": self.versions,
            "deleted": self.deleted,
        }


def tensor_digest(tensors: dict[str, torch.Tensor], extra: bytes = b"") -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, sorted by key, then ``extra``."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(extra)
    return digest.hexdigest()
