"""Everything the server does with adapters: resolve, check, load (cached), lease, release, pin.

The model side (hooks) is ``LoRAModelManager``; the memory side is ``AdapterCache``; this class ties
them to the registry. It notices new versions: whenever a ``latest`` request resolves to a newer
version than the one seen before, cache entries of that id's other versions are dropped (pinned
``id@N`` requests still work: they just load again), so versions registered by the CLI, the trainer
or another replica are picked up by the next request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from adapters.identity import BaseIdentity
from adapters.prepare import check_open_compatible
from adapters.records import AdapterVersion
from adapters.registry import Registry
from basemodel.errors import ValidationFailed
from basemodel.loader import BaseModel
from basemodel.settings import Settings
from service.lora.cache import AdapterCache, Budgets
from service.lora.model_manager import LoRAModelManager
from service.lora.request import AdapterRequest, AppliedAdapter
from service.metrics import Metrics

log = logging.getLogger(__name__)
MIB = 1 << 20


class AdapterManager:
    def __init__(self, settings: Settings, base: BaseModel, metrics: Metrics) -> None:
        self.identity = BaseIdentity.from_base_model(base)
        self.registry = Registry.from_settings(settings, self.identity)
        self.strict_base = settings.strict_base
        self.models = LoRAModelManager(base.lora_components)
        self.cache = AdapterCache(
            self.registry,
            self.models.targets,
            base.device,
            base.dtype,
            Budgets(
                device_bytes=settings.adapter_cache_device_mb * MIB,
                host_bytes=settings.adapter_cache_host_mb * MIB,
                disk_bytes=settings.adapter_cache_disk_mb * MIB,
            ),
            settings.home / "cache" / "adapters",
            metrics,
        )
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- resolution (blocking: store I/O) -------------------------------------------------------------
    def resolve(self, request: AdapterRequest) -> AdapterVersion:
        """Reference → live version, refused (409) when it does not fit the resident base model."""
        version = self.registry.resolve(request.ref)
        check_open_compatible(version, self.identity, self.strict_base)
        if request.version is None:
            self._note_latest(version)
        return version

    def _note_latest(self, version: AdapterVersion) -> None:
        with self._lock:
            seen = self._latest.get(version.adapter_id)
            self._latest[version.adapter_id] = version.version
        if seen is not None and seen != version.version:
            dropped = self.cache.drop(lambda key: key[0] == version.adapter_id and key[1] != version.version)
            log.info(
                "%s: latest is now v%d (was v%d); dropped %d stale entries",
                version.adapter_id,
                version.version,
                seen,
                dropped,
            )

    # -- per request --------------------------------------------------------------------------------
    async def prepare(self, requests: Sequence[AdapterRequest]) -> tuple[AppliedAdapter, ...]:
        """Resolve, load (once, off the inference thread) and lease every requested adapter."""
        ids = [r.adapter_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValidationFailed("an adapter is listed twice", detail={"field": "adapters", "ids": ids})
        versions = await asyncio.to_thread(lambda: [self.resolve(r) for r in requests])
        applied: list[AppliedAdapter] = []
        try:
            for request, version in zip(requests, versions, strict=True):
                adapter = await self.cache.acquire(version)
                applied.append(AppliedAdapter(version, adapter, _scale(request, version)))
        except BaseException:
            self.release(applied)
            raise
        return tuple(applied)

    def release(self, applied: Sequence[AppliedAdapter]) -> None:
        for item in applied:
            self.cache.release(item.version)

    # -- warming ----------------------------------------------------------------------------------
    def preload(self, ref: str, *, pin: bool = False) -> AdapterVersion:
        """Make ``ref`` device-resident now (blocking)."""
        from service.lora.request import extract_prompt_adapters

        _, parsed = extract_prompt_adapters(f"<lora:{ref}>")
        version = self.resolve(parsed[0])
        self.cache.load_blocking(version, pin=pin)
        return version

    def close(self) -> None:
        self.cache.close()
        self.models.remove()


def _scale(request: AdapterRequest, version: AdapterVersion) -> float:
    if request.scale is not None:
        return request.scale
    if version.scale_default is not None:
        return version.scale_default
    return 1.0
