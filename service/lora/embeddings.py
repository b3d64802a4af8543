"""Textual-inversion embeddings in prompts: which registered ids are embeddings, and which a prompt names.

A prompt (or negative prompt) names an embedding A1111's way, by its id as a word (``easynegative``),
or ComfyUI's, ``embedding:easynegative`` (a ``.safetensors`` / ``.pt`` extension is ignored);
``embedding:id@N`` pins a version. Bare ids are matched against the ids whose latest version is an
embedding (``EmbeddingIndex``: one registry listing, reused for ``embedding_list_ttl_s`` and refreshed in
the background after that, so requests never wait on the store for it except before the first listing;
changes made through this server apply at once);
the ``embedding:`` form is resolved whatever the listing says. The vectors apply to that request only
(``basemodel.textual_inversion``); the names and versions used are in its response and PNG parameters.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from adapters.records import AdapterVersion
from adapters.registry import Registry
from basemodel.textual_inversion import PREFIX, pattern
from service.lora.resolver import StoreGate
from service.lora.weights import DeviceAdapter

log = logging.getLogger(__name__)
KIND = "embedding"
MAX_PER_REQUEST = 16
"""Distinct embeddings one request may name (prompt and negative prompt together)."""
# embedding:<id>[@N][.safetensors|.pt], ids as adapters.refs allows them
EXPLICIT = re.compile(
    rf"(?<![\w@:.-]){re.escape(PREFIX)}(?P<ref>[a-z0-9][a-z0-9._-]*?(?:@\d+)?)(?:\.safetensors|\.pt)?(?![\w@-]|\.\w)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AppliedEmbedding:
    """An embedding a request's prompt names, resolved to a version and ready on the device."""

    name: str  # as the prompt writes it, lowercase: the id, or id@N
    version: AdapterVersion
    adapter: DeviceAdapter
    stale: bool = False

    @property
    def vectors(self) -> int:
        return self.version.rank

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "name": self.name,
            "id": self.version.adapter_id,
            "version": self.version.version,
            "sha256": self.version.sha256,
            "vectors": self.vectors,
        }
        if self.stale:
            described["stale"] = True
        return described


def named(texts: Iterable[str], known: Iterable[str]) -> list[str]:
    """The embedding names ``texts`` use, lowercase, in order of first use: ``embedding:ref`` forms, and
    ``known`` ids written as words."""
    found: dict[str, None] = {}
    known = list(known)
    for text in texts:
        if not text:
            continue
        spans = sorted(
            [(m.start(), m["ref"].lower()) for m in EXPLICIT.finditer(text)]
            + ([(m.start(), m["name"].lower()) for m in pattern(known).finditer(text)] if known else [])
        )
        for _, name in spans:
            found.setdefault(name, None)
    return list(found)


class EmbeddingIndex:
    """The ids whose latest live version is an embedding, from a registry listing at most ``ttl_s`` old
    (older: served as is while a refresh runs in the background)."""

    def __init__(
        self, registry: Registry, gate: StoreGate, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry
        self.gate = gate
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._ids: frozenset[str] | None = None
        self._at = 0.0
        # changes made through this server: id → (when, is an embedding), laid over older listings
        self._changes: dict[str, tuple[float, bool]] = {}

    def refresh(self) -> Future[frozenset[str]]:
        """Start a listing (one at a time); its result replaces the index."""
        return self.gate.submit("embedding-index", self._list)

    def _list(self) -> frozenset[str]:
        started = self._clock()
        ids = frozenset(
            s.adapter_id for s in self.registry.list() if s.latest is not None and s.latest.kind == KIND
        )
        with self._lock:
            for adapter_id, (when, embedding) in list(self._changes.items()):
                if when < started:  # the listing saw it
                    del self._changes[adapter_id]
                else:
                    ids = ids | {adapter_id} if embedding else ids - {adapter_id}
            self._ids, self._at = ids, started
        return ids

    async def ids(self, deadline: float) -> frozenset[str]:
        """The embedding ids; waits (until ``deadline``) only when no listing has succeeded yet. When the
        store cannot be listed, none are known (``embedding:id`` still resolves): a request without
        embeddings never fails because of this listing."""
        with self._lock:
            ids, age = self._ids, self._clock() - self._at
        if ids is not None:
            if age > self.ttl_s:
                self.refresh().add_done_callback(_log_failure)
            return ids
        try:
            return await self.gate.wait(self.refresh(), deadline, "listing embeddings")
        except Exception as exc:
            log.warning("cannot list embeddings (bare embedding ids are not recognised until then): %s", exc)
            return frozenset()

    def registered(self, version: AdapterVersion) -> None:
        """A version created through this server: its id is (or stops being) an embedding at once."""
        embedding = version.kind == KIND
        with self._lock:
            self._changes[version.adapter_id] = (self._clock(), embedding)
            if self._ids is not None:
                others = self._ids - {version.adapter_id}
                self._ids = others | {version.adapter_id} if embedding else others

    def deleted(self, adapter_id: str) -> None:
        """Versions of ``adapter_id`` deleted through this server: list again at the next request."""
        with self._lock:
            self._at = float("-inf")


def _log_failure(future: Future[frozenset[str]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("listing embeddings failed: %s", future.exception())
