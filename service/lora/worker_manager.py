"""Everything the server does with adapters: resolve, check, load (cached), lease, release, pin.

The model side (hooks, fusing) is ``LoRAModelManager``; the memory side is ``AdapterCache``; references are
resolved by ``AdapterResolver`` (from memory for what the server holds, within a deadline otherwise),
over a registry whose store calls go through a circuit breaker. It notices new versions: whenever
``latest`` resolves to another version than the one seen before, cache entries of that id's other
versions are dropped (pinned ``id@N`` requests still work: they just load again), so versions
registered by the CLI, the trainer or another replica are picked up within ``latest_ttl_s``, and
versions registered through this server at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from adapters.identity import BaseIdentity
from adapters.prepare import check_open_compatible
from adapters.records import AdapterVersion
from adapters.refs import parse_ref
from adapters.registry import Registry
from adapters.sources import open_settings_store
from adapters.sources.breaker import BreakerProber, BreakerStore, CircuitBreaker, State
from basemodel.errors import ValidationFailed
from basemodel.loader import BaseModel
from basemodel.settings import Settings
from service.lora.cache import AdapterCache, Budgets
from service.lora.embeddings import KIND, MAX_PER_REQUEST, AppliedEmbedding, EmbeddingIndex, named
from service.lora.model_manager import LoRAModelManager
from service.lora.request import AdapterRequest, AppliedAdapter, adapter_request
from service.lora.resolver import AdapterResolver, Resolution, StoreGate
from service.metrics import Metrics

log = logging.getLogger(__name__)
MIB = 1 << 20
T = TypeVar("T")
STORE_OPERATIONS = ("list", "read", "write", "create", "stat", "delete")
BREAKER_LEVEL: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}


class AdapterManager:
    def __init__(self, settings: Settings, base: BaseModel, metrics: Metrics) -> None:
        self.identity = BaseIdentity.from_base_model(base)
        self.breaker = CircuitBreaker(
            settings.store_breaker_failures,
            settings.store_breaker_cooldown_s,
            on_state=lambda state: metrics.store_breaker.set(BREAKER_LEVEL[state]),
            probe_interval_s=settings.store_probe_interval_s,
        )
        for operation in STORE_OPERATIONS:
            metrics.store_errors.labels(operation=operation)
        store = BreakerStore(
            open_settings_store(settings),
            self.breaker,
            on_error=lambda operation, _: metrics.store_errors.labels(operation=operation).inc(),
        )
        self.prober = BreakerProber(store)  # closes the breaker soon after the store is back
        self.registry = Registry.from_settings(settings, self.identity, store=store)
        self.strict_base = settings.strict_base
        self.store_deadline_s = settings.store_deadline_s
        self.models = LoRAModelManager(
            base.lora_components,
            mode=settings.lora_path,
            fuse_budget_bytes=settings.lora_fuse_budget_mb * MIB,
            metrics=metrics,
        )
        self.cache = AdapterCache(
            self.registry,
            self.models.targets,
            base.device,
            base.dtype,
            Budgets(
                device_bytes=settings.adapter_cache_device_mb * MIB,
                host_bytes=settings.adapter_cache_host_mb * MIB,
                disk_bytes=settings.adapter_cache_disk_mb * MIB,
                pool_bytes=settings.adapter_load_pool_mb * MIB,
            ),
            settings.adapter_cache_dir or settings.home / "cache" / "adapters",
            metrics,
            base_weight=self.models.loaded_weight,
        )
        self.gate = StoreGate(self.breaker.retry_after_s)
        self.resolver = AdapterResolver(
            self.registry,
            self.gate,
            self.cache.holds,
            ttl_s=settings.latest_ttl_s,
            stale_max_s=settings.latest_stale_max_s,
            on_latest=self._latest_changed,
        )
        self.embeddings = EmbeddingIndex(self.registry, self.gate, settings.embedding_list_ttl_s)
        self.embeddings.refresh()  # in the background: the first prompt rarely waits for it
        self.prober.start()

    def deadline(self) -> float:
        """The monotonic time until which a request started now may wait for the store."""
        return time.monotonic() + self.store_deadline_s

    async def read(self, fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T:
        """Run a blocking registry read (listing, show) off the event loop, waiting until the deadline."""
        return await self.gate.call(fn, *args, deadline=self.deadline(), what=what, **kwargs)

    async def check_store(self, adapter_id: str) -> None:
        """Before a write: one listing of ``adapter_id`` within the deadline, else 503 at once."""
        await self.read(self.registry.state, adapter_id, what=f"for adapter {adapter_id}")

    # -- resolution -----------------------------------------------------------------------------------
    def _checked(self, resolution: Resolution) -> Resolution:
        """Refused (409) when the version does not fit the resident base model."""
        check_open_compatible(resolution.version, self.identity, self.strict_base)
        return resolution

    def _latest_changed(self, version: AdapterVersion, previous: int | None) -> None:
        if previous is None:
            return
        dropped = self.cache.drop(lambda key: key[0] == version.adapter_id and key[1] != version.version)
        log.info(
            "%s: latest is now v%d (was v%d); dropped %d stale entries",
            version.adapter_id,
            version.version,
            previous,
            dropped,
        )

    def registered(self, version: AdapterVersion) -> None:
        """A version created through this server: requests see it at once."""
        self.resolver.note_registered(version)
        self.embeddings.registered(version)

    def deleted(self, removed: Sequence[AdapterVersion]) -> None:
        """Versions deleted through this server: 404 at once; unpinned cache entries are dropped."""
        if not removed:
            return
        adapter_id = removed[0].adapter_id
        numbers = {v.version for v in removed}
        self.resolver.note_deleted(adapter_id, numbers)
        self.embeddings.deleted(adapter_id)
        self.cache.drop(lambda key: key[0] == adapter_id and key[1] in numbers)

    # -- per request --------------------------------------------------------------------------------
    async def prepare(
        self, requests: Sequence[AdapterRequest], *, embeddings: bool = False
    ) -> tuple[AppliedAdapter, ...]:
        """Resolve, load (once, off the inference thread) and lease every requested adapter: weight
        adapters, or (``embeddings``) textual-inversion embeddings — the other kind is 422."""
        ids = [r.adapter_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValidationFailed("an adapter is listed twice", detail={"field": "adapters", "ids": ids})
        deadline = self.deadline()
        resolved = [self._checked(await self.resolver.resolve(r, deadline)) for r in requests]
        for resolution in resolved:
            _check_kind(resolution.version, embeddings)
        applied: list[AppliedAdapter] = []
        try:
            for request, resolution in zip(requests, resolved, strict=True):
                version = resolution.version
                adapter = await self.cache.acquire(version)
                applied.append(
                    AppliedAdapter(
                        version,
                        adapter,
                        _scale(request, version),
                        stale=resolution.stale,
                        denoiser_scale=request.denoiser_scale,
                        text_encoder_scale=request.text_encoder_scale,
                    )
                )
        except BaseException:
            self.release(applied)
            raise
        return tuple(applied)

    def release(self, applied: Sequence[AppliedAdapter | AppliedEmbedding]) -> None:
        for item in applied:
            self.cache.release(item.version)

    async def prepare_embeddings(self, *texts: str) -> tuple[AppliedEmbedding, ...]:
        """Resolve, load and lease the textual-inversion embeddings ``texts`` name (``service.lora.
        embeddings``); a name that resolves to another kind of adapter is 422."""
        known = await self.embeddings.ids(self.deadline())
        names = named(texts, known)
        if len(names) > MAX_PER_REQUEST:
            raise ValidationFailed(
                f"the prompts name {len(names)} embeddings; at most {MAX_PER_REQUEST} per request",
                detail={"field": "prompt", "names": names[:MAX_PER_REQUEST], "limit": MAX_PER_REQUEST},
            )
        applied: list[AppliedEmbedding] = []
        try:
            for name in names:
                ref = parse_ref(name)
                request = adapter_request(ref.adapter_id, ref.version, None, field="prompt")
                (loaded,) = await self.prepare([request], embeddings=True)
                applied.append(AppliedEmbedding(name, loaded.version, loaded.adapter, loaded.stale))
        except BaseException:
            self.release(applied)
            raise
        return tuple(applied)

    # -- warming ----------------------------------------------------------------------------------
    async def preload(self, ref: str, *, pin: bool = False) -> Resolution:
        """Make ``ref`` device-resident now (the HTTP route: resolution bounded by the deadline)."""
        resolution = self._checked(await self.resolver.resolve(_request(ref), self.deadline()))
        if self.cache.lookup_resident(resolution.version, pin=pin) is None:  # resident: no thread hand-off
            await asyncio.to_thread(self.cache.load_blocking, resolution.version, pin=pin)
        return resolution

    def preload_blocking(self, ref: str, *, pin: bool = False) -> AdapterVersion:
        """Make ``ref`` device-resident now from a plain thread (pins at start-up)."""
        resolution = self._checked(self.resolver.resolve_blocking(_request(ref)))
        self.cache.load_blocking(resolution.version, pin=pin)
        return resolution.version

    # -- health -------------------------------------------------------------------------------------
    def store_health(self) -> dict[str, Any]:
        """The store as the last calls saw it: ok, degraded (failures, probing) or down (breaker open)."""
        snapshot = self.breaker.snapshot()
        if snapshot["breaker"] == "open":
            state = "down"
        elif snapshot["breaker"] == "half_open" or snapshot["consecutive_failures"]:
            state = "degraded"
        else:
            state = "ok"
        health = {"state": state, **snapshot}
        if state == "down":
            health["retry_after_s"] = self.breaker.retry_after_s()
        return health

    def close(self) -> None:
        self.prober.close()
        self.gate.close()
        self.cache.close()
        self.models.remove()


def _request(ref: str) -> AdapterRequest:
    parsed = parse_ref(ref)
    return AdapterRequest(parsed.adapter_id, parsed.version)


def _scale(request: AdapterRequest, version: AdapterVersion) -> float:
    if request.scale is not None:
        return request.scale
    if version.scale_default is not None:
        return version.scale_default
    return 1.0


def _check_kind(version: AdapterVersion, embeddings: bool) -> None:
    """Embeddings are named in prompts, weight adapters in ``adapters`` / ``<lora:…>`` tags (422 if not)."""
    if (version.kind == KIND) == embeddings:
        return
    if embeddings:
        raise ValidationFailed(
            f"the prompt names embedding:{version.adapter_id}, but {version.ref} is a {version.kind} "
            "adapter, not a textual-inversion embedding",
            detail={"field": "prompt", "ref": version.ref, "kind": version.kind},
            hint="Apply LoRAs with <lora:id:weight> or the adapters field.",
        )
    raise ValidationFailed(
        f"{version.ref} is a textual-inversion embedding: it is used by writing its id in the prompt or "
        "negative prompt, not as an adapter",
        detail={"field": "adapters", "ref": version.ref, "kind": version.kind},
        hint=f"Write {version.adapter_id} (or embedding:{version.adapter_id}) in the prompt.",
    )
