"""The resident model and everything around it: loading, warm-up, readiness and running jobs."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from basemodel.errors import NotReady, NotSupported, RequestTimeout, ValidationFailed
from basemodel.loader import BaseModel, load_base_model
from basemodel.settings import Settings
from service.engine.png import encode_png
from service.engine.sampler import SampleParams, StageTimer, sample
from service.engine.schedulers import a1111_label
from service.engine.worker import InferenceWorker, Job
from service.metrics import Metrics
from service.schemas import GenerateRequest

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return metadata.version("loraswap")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"


@dataclass
class GenerationResult:
    pngs: list[bytes]
    params: SampleParams
    parameters: dict[str, Any]
    timings: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [
                {
                    "png_base64": base64.b64encode(png).decode(),
                    "seed": self.params.seed + i,
                    "width": self.params.width,
                    "height": self.params.height,
                }
                for i, png in enumerate(self.pngs)
            ],
            "seed": self.params.seed,
            "parameters": self.parameters,
            "timings": self.timings,
            "adapters": [],
        }


class Runtime:
    """Owns the base model and the inference worker for one app."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        loader: Callable[[Settings], BaseModel] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = "starting"
        self.error: str | None = None
        self.base: BaseModel | None = None
        self._loader = loader or _default_loader
        self.worker = InferenceWorker(self._run_job, settings.max_queue, metrics)
        self._loading: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start loading in the background so /healthz and /readyz answer meanwhile."""
        self._loading = threading.Thread(target=self._load_and_warm, name="loraswap-load", daemon=True)
        self._loading.start()

    def stop(self) -> None:
        self.state = "stopping"
        self.metrics.ready.set(0)
        if self._loading is not None:
            self._loading.join(self.settings.graceful_timeout_s)
        self.worker.stop(self.settings.graceful_timeout_s)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _load_and_warm(self) -> None:
        try:
            self.state = "loading"
            self.base = self._loader(self.settings)
            self.worker.start()
            if self.settings.warmup:
                self.state = "warming"
                self._warm_up()
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info("ready: %s (%s) fingerprint %s", self.base.name, self.base.device, self.base.fingerprint)
        except Exception as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the base model failed")

    def _warm_up(self) -> None:
        assert self.base is not None
        size = self.base.native_size
        params = SampleParams("warm-up", "", 2, 7.5, size, size, 0, 1, "ddim")
        sample(self.base.pipe, params, StageTimer())

    # -- requests ------------------------------------------------------------------------------
    def check_ready(self) -> BaseModel:
        if self.state == "failed":
            raise NotReady(f"the base model failed to load: {self.error}", hint="See the server log.")
        if not self.ready or self.base is None:
            raise NotReady(f"the server is {self.state}")
        return self.base

    def params_for(self, request: GenerateRequest) -> SampleParams:
        base = self.check_ready()
        if request.adapters:
            raise NotSupported(
                "adapters are not served by this build yet",
                detail={"adapters": [a.id for a in request.adapters]},
                hint="Drop the 'adapters' field; per-request LoRA lands with the hot-swap engine.",
            )
        width = request.width or base.native_size
        height = request.height or base.native_size
        limits = self.settings
        for name, value, limit in (("width", width, limits.max_width), ("height", height, limits.max_height)):
            if value > limit:
                raise ValidationFailed(
                    f"{name} {value} exceeds the server's limit of {limit}", detail={"field": name}
                )
        if request.steps > limits.max_steps:
            raise ValidationFailed(
                f"steps exceeds the server's limit of {limits.max_steps}", detail={"field": "steps"}
            )
        if request.num_images > limits.max_images:
            raise ValidationFailed(
                f"num_images exceeds the server's limit of {limits.max_images}",
                detail={"field": "num_images"},
            )
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        return SampleParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=width,
            height=height,
            seed=seed,
            num_images=request.num_images,
            scheduler=request.scheduler,
        )

    async def generate(
        self, params: SampleParams, wait_disconnect: Callable[[], Any]
    ) -> GenerationResult | None:
        """Queue a job and wait for it; ``None`` when the client went away first."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout_s
        job: Job[GenerationResult] = Job(params, deadline, loop, loop.create_future())
        self.worker.submit(job)
        gone = asyncio.ensure_future(wait_disconnect())
        try:
            done, _ = await asyncio.wait(
                {job.future, gone},
                timeout=self.settings.request_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if job.future in done:
            return job.future.result()
        job.abandoned.set()
        if gone in done:
            log.info("client disconnected; dropped its job (seed %s)", params.seed)
            return None
        raise RequestTimeout(f"generation did not finish within {self.settings.request_timeout_s:g} s")

    def _run_job(self, job: Job[Any]) -> GenerationResult:
        assert self.base is not None
        params: SampleParams = job.payload
        timer = StageTimer({"queue": (job.started_at or job.enqueued_at) - job.enqueued_at})
        try:
            images = sample(self.base.pipe, params, timer, should_stop=job.should_stop)
        except Exception:
            if job.should_stop() and not job.abandoned.is_set():
                raise RequestTimeout("generation exceeded the request timeout") from None
            raise
        parameters = self.describe(params)
        started = time.perf_counter()
        pngs = [encode_png(image, {**parameters, "seed": params.seed + i}) for i, image in enumerate(images)]
        timer.add("encode", started)
        timings = {f"{stage}_s": round(seconds, 6) for stage, seconds in timer.seconds.items()}
        timings["total_s"] = round(sum(timer.seconds.values()), 6)
        for stage, seconds in timer.seconds.items():
            self.metrics.stage_duration.labels(stage=stage).observe(seconds)
        self.metrics.images.inc(len(pngs))
        return GenerationResult(pngs, params, parameters, timings)

    def describe(self, params: SampleParams) -> dict[str, Any]:
        assert self.base is not None
        return {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "steps": params.steps,
            "sampler": a1111_label(params.scheduler),
            "scheduler": params.scheduler,
            "guidance_scale": params.guidance_scale,
            "seed": params.seed,
            "width": params.width,
            "height": params.height,
            "num_images": params.num_images,
            "model": self.base.name,
            "model_hash": self.base.fingerprint,
            "version": package_version(),
        }


def _default_loader(settings: Settings) -> BaseModel:
    return load_base_model(
        settings.base_model,
        settings.models_dir,
        device=settings.device,
        dtype=settings.dtype,
        attention=settings.attention,
    )
