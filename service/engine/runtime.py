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

from PIL import Image

from basemodel.errors import NotReady, RequestTimeout
from basemodel.loader import BaseModel, load_base_model
from basemodel.settings import Settings
from service.engine.image_modes import ImageInput
from service.engine.inputs import (
    ProbedInputs,
    check_mode,
    check_size,
    load_inputs,
    output_size,
    probe_inputs,
)
from service.engine.limits import Limits
from service.engine.png import encode_png, lora_hashes
from service.engine.progress import JobProgress
from service.engine.recent import RecentRequests
from service.engine.sampler import SampleParams, StageTimer, sample_batch
from service.engine.schedulers import a1111_label, check_available, check_scheduler
from service.engine.worker import InferenceWorker, Job
from service.lora.embeddings import AppliedEmbedding
from service.lora.request import adapter_request, extract_prompt_adapters
from service.lora.worker_manager import AdapterManager
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
    lora_path: str = "none"

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
            "lora_path": self.lora_path,
            "adapters": [a.describe() for a in self.params.adapters],
            "embeddings": [e.describe() for e in self.params.embeddings],
        }


@dataclass(frozen=True)
class Work:
    """What a queued job carries: the sampling parameters and time already spent loading adapters."""

    params: SampleParams
    adapter_load_s: float


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
        self.adapters: AdapterManager | None = None
        self.limits: Limits | None = None  # known once the model is loaded (they follow its size)
        self._loader = loader or _default_loader
        self.recent = RecentRequests()
        self.worker = InferenceWorker(
            self._run_batch,
            settings.max_queue,
            metrics,
            max_batch=settings.max_batch_size or default_batch_size(settings),
            window_s=settings.batch_window_ms / 1000,
            batch_key=lambda job: job.payload.params.batch_key(),
        )
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
        if self.adapters is not None:
            self.adapters.close()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _load_and_warm(self) -> None:
        try:
            self.state = "loading"
            self.base = self._loader(self.settings)
            self.limits = Limits.for_model(self.settings, self.base.native_size)
            self.adapters = AdapterManager(self.settings, self.base, self.metrics)
            self._pin_adapters()
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

    def _pin_adapters(self) -> None:
        assert self.adapters is not None
        for ref in self.settings.pinned_adapters:
            try:
                version = self.adapters.preload_blocking(ref, pin=True)
                log.info("pinned adapter %s", version.ref)
            except Exception as exc:  # a missing pin must not keep the server down; say so loudly
                log.error("could not pin adapter %s: %s", ref, exc)

    def _warm_up(self) -> None:
        assert self.base is not None
        size = self.base.native_size
        image = None
        if self.base.family.inpainting(self.base.pipe):  # an inpainting checkpoint only inpaints
            blank, everything = Image.new("RGB", (size, size)), Image.new("L", (size, size), 255)
            image = ImageInput(blank, everything, 1.0)
        family = self.base.family
        scheduler = family.default_scheduler
        params = SampleParams(
            "warm-up", "", 2, family.default_guidance, size, size, 0, 1, scheduler, image=image
        )
        sample_batch(self.base.pipe, [params], StageTimer(), encoders=self.base.encoders)

    # -- requests ------------------------------------------------------------------------------
    def check_ready(self) -> BaseModel:
        if self.state == "failed":
            raise NotReady(f"the base model failed to load: {self.error}", hint="See the server log.")
        if not self.ready or self.base is None:
            raise NotReady(f"the server is {self.state}")
        return self.base

    async def prepare(self, request: GenerateRequest) -> Work:
        """Validate against the server limits, refuse if the queue is full, fix the seed, and resolve +
        lease the adapters (invalid input is 422 even under overload; a full queue is 429 before any
        adapter is resolved or loaded)."""
        base = self.check_ready()
        prompt, tagged = extract_prompt_adapters(request.prompt)
        wanted = [
            adapter_request(
                a.id,
                a.version,
                a.scale,
                field=f"adapters.{i}",
                denoiser_scale=a.denoiser_scale,
                unet_scale=a.unet_scale,
                text_encoder_scale=a.text_encoder_scale,
            )
            for i, a in enumerate(request.adapters)
        ] + tagged
        check_mode(base, request)
        family = base.family
        scheduler = request.scheduler or family.default_scheduler
        check_scheduler(
            scheduler, flow_matching=family.flow_matching, family=f"{family.label} ({family.name})"
        )
        check_available(scheduler)
        probed: ProbedInputs | None = None
        if request.init_image is not None:
            probed = await asyncio.to_thread(probe_inputs, request, self.settings)
        limits = self.limits or Limits.for_model(self.settings, base.native_size)
        width, height = output_size(request, base.native_size, probed, limits)
        limits.check(width, height, request.steps, request.num_images)
        check_size(base, width, height)
        self.worker.admit()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        image = None
        if probed is not None:
            start = family.start_step(request.steps, request.strength)
            image = await asyncio.to_thread(load_inputs, probed, request.strength, self.settings, start)
        started = time.perf_counter()
        applied = await self.adapters.prepare(wanted) if (wanted and self.adapters) else ()
        try:
            embeddings = await self._embeddings(prompt, request.negative_prompt)
        except BaseException:
            if self.adapters is not None:
                self.adapters.release(applied)
            raise
        params = SampleParams(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            guidance_scale=family.default_guidance
            if request.guidance_scale is None
            else request.guidance_scale,
            width=width,
            height=height,
            seed=seed,
            num_images=request.num_images,
            scheduler=scheduler,
            adapters=applied,
            image=image,
            embeddings=embeddings,
            true_cfg_scale=request.true_cfg_scale,
        )
        return Work(params, time.perf_counter() - started if (applied or embeddings) else 0.0)

    async def _embeddings(self, prompt: str, negative_prompt: str) -> tuple[AppliedEmbedding, ...]:
        if self.adapters is None or not (prompt or negative_prompt):
            return ()
        return await self.adapters.prepare_embeddings(prompt, negative_prompt)

    def release(self, work: Work) -> None:
        if self.adapters is not None and (work.params.adapters or work.params.embeddings):
            self.adapters.release([*work.params.adapters, *work.params.embeddings])

    async def generate(self, work: Work, wait_disconnect: Callable[[], Any]) -> GenerationResult | None:
        """Queue a job and wait for it; ``None`` when the client went away first."""
        return await self.wait(self.enqueue(work), wait_disconnect)

    def enqueue(self, work: Work, progress: JobProgress | None = None) -> Job[GenerationResult]:
        """Put a job in the worker's queue (429 ``Overloaded`` when it is full); call on the loop."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout_s
        job: Job[GenerationResult] = Job(
            work, deadline, loop, loop.create_future(), progress=progress or JobProgress(work.params.steps)
        )
        self.worker.submit(job)
        return job

    async def wait(
        self, job: Job[GenerationResult], wait_disconnect: Callable[[], Any]
    ) -> GenerationResult | None:
        """The job's result; ``None`` (and the job is dropped, or stopped within its step) when
        ``wait_disconnect`` returned first: the client went away, or cancelled the job."""
        work: Work = job.payload
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
            log.info("client disconnected or cancelled; dropped its job (seed %s)", work.params.seed)
            return None
        raise RequestTimeout(f"generation did not finish within {self.settings.request_timeout_s:g} s")

    def _run_batch(self, jobs: list[Job[Any]]) -> list[Any]:
        """Run compatible jobs in one denoising loop; one outcome per job."""
        assert self.base is not None
        batch: list[SampleParams] = [job.payload.params for job in jobs]
        timer = StageTimer()
        lora = self.adapters.models if self.adapters is not None else None
        try:
            images = sample_batch(
                self.base.pipe,
                batch,
                timer,
                lambda: all(j.should_stop() for j in jobs),
                lora,
                on_step=_advance_all(jobs),
                encoders=self.base.encoders,
            )
        except Exception as exc:
            failure: Exception = exc
            if all(j.should_stop() for j in jobs) and not all(j.abandoned.is_set() for j in jobs):
                failure = RequestTimeout("generation exceeded the request timeout")
            for job in jobs:  # a job its client left or cancelled stopped on purpose
                outcome = "cancelled" if job.abandoned.is_set() else "failed"
                error = None if outcome == "cancelled" else type(failure).__name__
                self.recent.add(job.payload.params, outcome=outcome, timings=timer.rounded(), error=error)
            return [failure] * len(jobs)
        return [self._finish(job, pictures, timer) for job, pictures in zip(jobs, images, strict=True)]

    def _finish(self, job: Job[Any], images: list[Any], shared: StageTimer) -> GenerationResult:
        work: Work = job.payload
        params = work.params
        timer = StageTimer(dict(shared.seconds))
        timer.seconds["queue"] = (job.started_at or job.enqueued_at) - job.enqueued_at
        if work.adapter_load_s:
            timer.seconds["adapter_load"] = work.adapter_load_s
        parameters = self.describe(params)
        started = time.perf_counter()
        pngs = [encode_png(image, {**parameters, "seed": params.seed + i}) for i, image in enumerate(images)]
        timer.add("encode", started)
        timings = timer.rounded()
        self.recent.add(params, outcome="succeeded", timings=timings, lora_path=shared.lora_path)
        for stage, seconds in timer.seconds.items():
            self.metrics.stage_duration.labels(stage=stage).observe(seconds)
        self.metrics.images.inc(len(pngs))
        self.metrics.generations.labels(mode=params.mode).inc()
        return GenerationResult(pngs, params, parameters, timings, shared.lora_path)

    def describe(self, params: SampleParams) -> dict[str, Any]:
        assert self.base is not None
        image_mode = {} if params.image is None else {"strength": params.image.strength}
        family = self.base.family
        flow = family.flow_matching
        true_cfg = {"true_cfg_scale": params.true_cfg_scale} if params.true_cfg_scale != 1.0 else {}
        # what ran, in A1111/Forge's terms: the classifier-free scale (≤ 1: none) and, on a
        # guidance-distilled model (Flux-dev), the embedded guidance
        distilled = (
            {"distilled_cfg_scale": params.guidance_scale} if family.embeds_guidance(self.base.pipe) else {}
        )
        return {
            "mode": params.mode,
            **image_mode,
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "steps": params.steps,
            "sampler": a1111_label(params.scheduler, flow_matching=flow),
            "scheduler": params.scheduler,
            "guidance_scale": params.guidance_scale,
            **true_cfg,
            "cfg_scale": params.cfg_scale(family),
            **distilled,
            "seed": params.seed,
            "width": params.width,
            "height": params.height,
            "num_images": params.num_images,
            "model": self.base.name,
            "model_hash": self.base.fingerprint,
            "version": package_version(),
            "adapters": [a.describe() for a in params.adapters],
            "lora_hashes": lora_hashes([a.describe() for a in params.adapters]),
            "embeddings": [e.describe() for e in params.embeddings],
            "ti_hashes": ", ".join(f"{e.name}: {e.version.sha256[:12]}" for e in params.embeddings),
        }


def _advance_all(jobs: list[Job[Any]]) -> Callable[[int, int], None]:
    def on_step(step: int, steps: int) -> None:
        for job in jobs:
            job.progress.advance(step, steps)

    return on_step


def default_batch_size(settings: Settings) -> int:
    """Batch on GPUs, where it pays; on CPU keep every result bit-identical to the request alone."""
    import torch

    wants_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    return 4 if wants_cuda else 1


def _default_loader(settings: Settings) -> BaseModel:
    return load_base_model(
        settings.base_model,
        settings.models_dir,
        device=settings.device,
        dtype=settings.dtype,
        attention=settings.attention,
        text_encoder_device=settings.text_encoder_device,
        components=settings.base_components,
    )
