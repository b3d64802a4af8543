"""The sampling loop — text-to-image, image-to-image, inpainting — for one request or a batch.

It follows the model family's diffusers pipeline step for step — ``StableDiffusionPipeline.__call__``
for SD1.x/SD2.x, ``StableDiffusionXLPipeline.__call__`` for SDXL, ``StableDiffusion3Pipeline`` and
``FluxPipeline`` for the transformer families, and the Img2Img / Inpaint variants
(``engine/image_modes.py``): same prompt encoding, conditioning, latent initialisation, schedule,
guidance and VAE decode. What differs between families comes from the ``ModelFamily`` object — the
denoiser and its inputs (``encode``, ``denoiser_call``), the latent layout (``noise_latents``,
``decode``), the schedule (``set_timesteps``), the guidance (``cfg_scale``) — and what differs between
modes from the ``Start`` object, so the loop itself has no family branches.

LoRA adapters are active in two scopes: while the prompt is encoded, with each adapter's text-encoder
weight (``text_encoder_scale``, else ``scale``), and while the denoiser runs, with its denoiser weight
(``denoiser_scale``, alias ``unet_scale``, else ``scale``) — so per-component weights need nothing
from the hooks.

Any result reproduces in plain diffusers with
``generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]``. It is written out
here because the server needs per-stage timings, per-step cancellation, a per-request scheduler,
per-request LoRA adapters and batches that mix requests with different adapters.

A batch shares width, height, steps, scheduler, whether guidance is on, the mode and the first
denoising step that strength implies (``batch_key``); each request keeps its own init image and
mask, prompt, negative prompt, guidance scale, seed, image count, adapters and textual-inversion
embeddings (applied while its prompt is encoded: ``basemodel.textual_inversion``). Rows of the batch are
laid out as ``[uncond(req0), uncond(req1), …, cond(req0), cond(req1), …]``.

Text encoders run where ``encoders`` (``basemodel.text_encoders.TextEncoderPlacement``) puts them —
beside the denoiser, kept on the CPU, or moved to the GPU only while they encode — and their outputs
move to the denoiser's device.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from basemodel.families import DenoiserInputs, ModelFamily, detect_pipeline
from basemodel.loader import Pipeline
from basemodel.text_encoders import TextEncoderPlacement
from basemodel.textual_inversion import Embedding
from service.engine.cancel import Cancelled, interruptible
from service.engine.image_modes import ImageInput, prepare_start, start_index, timesteps_from
from service.engine.schedulers import make_scheduler
from service.lora.embeddings import AppliedEmbedding
from service.lora.model_manager import ActiveLoRA, LoRAModelManager
from service.lora.request import AppliedAdapter


@dataclass(frozen=True)
class SampleParams:
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    scheduler: str
    adapters: tuple[AppliedAdapter, ...] = ()
    image: ImageInput | None = field(default=None, compare=False)  # img2img / inpainting
    # textual-inversion embeddings the prompt / negative prompt name (this request's only)
    embeddings: tuple[AppliedEmbedding, ...] = ()
    true_cfg_scale: float = 1.0  # Flux: real CFG with the negative prompt when > 1 (others ignore it)

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else self.image.mode

    @property
    def start(self) -> int | None:
        """The first denoising step (image modes: from strength); None for text-to-image."""
        if self.image is None:
            return None
        image = self.image
        return image.start if image.start is not None else start_index(self.steps, image.strength)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one denoising loop (whether guidance is on is part of it
        under every family's rule: ``guidance_scale`` > 1, or ``true_cfg_scale`` > 1 with a negative
        prompt)."""
        guided = (self.guidance_scale > 1.0, self.true_cfg_scale > 1.0 and bool(self.negative_prompt))
        return (self.width, self.height, self.steps, self.scheduler, guided, self.mode, self.start)

    def cfg_scale(self, family: ModelFamily) -> float:
        """The classifier-free guidance scale the family applies for this request (≤ 1: none)."""
        return family.cfg_scale(self.guidance_scale, self.true_cfg_scale, self.negative_prompt)


@dataclass
class StageTimer:
    """Accumulates wall-clock seconds per stage; ``lora_path`` names how the batch applied adapters."""

    seconds: dict[str, float] = field(default_factory=dict)
    lora_path: str = "none"

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        """``{stage}_s`` per stage and ``total_s``, in seconds to the microsecond (the API's timings)."""
        timings = {f"{stage}_s": round(seconds, 6) for stage, seconds in self.seconds.items()}
        timings["total_s"] = round(sum(self.seconds.values()), 6)
        return timings


def generators_for(seed: int, n: int) -> list[torch.Generator]:
    """diffusers' convention: image i draws its initial noise from a CPU generator seeded seed + i."""
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


@contextmanager
def _using(
    lora: LoRAModelManager | None, active: list[ActiveLoRA], components: Sequence[str]
) -> Iterator[None]:
    """``active`` on ``components``; with none active the manager still runs, to take its hooks off."""
    with lora.activate(active, components) if lora is not None else nullcontext():
        yield


@contextmanager
def _denoising(
    lora: LoRAModelManager | None,
    batch: Sequence[SampleParams],
    rows: list[ActiveLoRA],
    shape: tuple[int, int, int],
    steps: int,
    timer: StageTimer,
) -> Iterator[None]:
    """The denoiser's adapters for the loop: no hook, fused weights or row-indexed hooks (the policy's)."""
    if lora is None:
        yield
        return
    requests = [_denoiser_loras(p.adapters) for p in batch]
    with lora.denoising(requests, rows, steps=steps, shape=shape) as applied:
        timer.lora_path = applied.path
        for stage, seconds in applied.seconds().items():
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + seconds
            # the caller's "denoise" stage spans this block: charge fusing/restoring to their own stages
            timer.seconds["denoise"] = timer.seconds.get("denoise", 0.0) - seconds
        yield


def _text_loras(adapters: Sequence[AppliedAdapter]) -> list[ActiveLoRA]:
    """Whole-batch adapters for prompt encoding, at their text-encoder weights (0: left out)."""
    return [ActiveLoRA(a.adapter, a.text_encoder_weight) for a in adapters if a.text_encoder_weight != 0]


def _denoiser_loras(adapters: Sequence[AppliedAdapter]) -> list[ActiveLoRA]:
    return [ActiveLoRA(a.adapter, a.denoiser_weight) for a in adapters if a.denoiser_weight != 0]


def _row_loras(
    batch: Sequence[SampleParams], copies: int, device: torch.device, dtype: torch.dtype
) -> list[ActiveLoRA]:
    """Per-adapter row sets for the denoiser at the adapters' denoiser weights; a single request keeps
    PEFT's exact scalar path. A weight of 0 contributes nothing and is left out."""
    if len(batch) == 1:
        return _denoiser_loras(batch[0].adapters)
    total = sum(p.num_images for p in batch)
    rows: dict[int, tuple[AppliedAdapter, list[int], list[float]]] = {}
    offset = 0
    for params in batch:
        for applied in params.adapters:
            if applied.denoiser_weight == 0:
                continue
            _, idx, scales = rows.setdefault(id(applied.adapter), (applied, [], []))
            for copy in range(copies):
                start = copy * total + offset
                idx.extend(range(start, start + params.num_images))
                scales.extend([applied.denoiser_weight] * params.num_images)
        offset += params.num_images
    active = []
    for applied, idx, scales in rows.values():
        if len(idx) == total * copies and len(set(scales)) == 1:
            active.append(ActiveLoRA(applied.adapter, scales[0]))
        else:
            row_scales = torch.tensor(scales, device=device, dtype=dtype)
            active.append(ActiveLoRA(applied.adapter, row_scales, torch.tensor(idx, device=device)))
    return active


def _guidance(batch: Sequence[SampleParams], family: ModelFamily, like: torch.Tensor) -> float | torch.Tensor:
    """Each row's classifier-free scale: one number when the batch shares it, else a tensor that
    broadcasts over a row of ``like`` (the latents)."""
    scales = [p.cfg_scale(family) for p in batch for _ in range(p.num_images)]
    if len(set(scales)) == 1:
        return scales[0]
    shape = (-1, *([1] * (like.ndim - 1)))
    return torch.tensor(scales, device=like.device, dtype=like.dtype).view(shape)


def _scaled(scheduler: Any, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scale_model_input`` where the scheduler has one (FlowMatch schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return model_input if scale is None else scale(model_input, t)


def _encode(
    pipe: Pipeline,
    family: ModelFamily,
    batch: Sequence[SampleParams],
    guided: bool,
    lora: LoRAModelManager | None,
    encoders: TextEncoderPlacement | None,
    device: torch.device,
) -> DenoiserInputs:
    """Every request's prompt (under its text-encoder LoRA weights), stacked uncond rows first."""
    first = batch[0]
    conds: list[DenoiserInputs] = []
    unconds: list[DenoiserInputs] = []
    with encoders.encoding() if encoders is not None else nullcontext(device) as where:
        for params in batch:
            with _using(lora, _text_loras(params.adapters), family.text_encoders):
                encoded = family.encode(
                    pipe,
                    params.prompt,
                    params.negative_prompt,
                    num_images=params.num_images,
                    guidance=guided,
                    width=first.width,
                    height=first.height,
                    guidance_scale=params.guidance_scale,
                    device=where,
                    embeddings={e.name: Embedding(e.name, e.adapter.vectors) for e in params.embeddings},
                )
            conds.append(encoded.cond)
            if encoded.uncond is not None:
                unconds.append(encoded.uncond)
    return DenoiserInputs.cat(unconds + conds).to(device)


@torch.no_grad()
def sample_batch(
    pipe: Pipeline,
    batch: Sequence[SampleParams],
    timer: StageTimer,
    should_stop: Callable[[], bool] = lambda: False,
    lora: LoRAModelManager | None = None,
    on_step: Callable[[int, int], None] = lambda step, steps: None,
    encoders: TextEncoderPlacement | None = None,
) -> list[list[Image.Image]]:
    """``on_step(i, n)`` is called after each denoising step i of n (progress reports); ``encoders``:
    where the text encoders run (default: where they are)."""
    first = batch[0]
    assert all(p.batch_key() == first.batch_key() for p in batch), "incompatible requests in one batch"
    family = detect_pipeline(pipe)
    denoiser = family.denoiser_module(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    do_cfg = first.cfg_scale(family) > 1.0
    counts = [p.num_images for p in batch]

    started = time.perf_counter()
    inputs = _encode(pipe, family, batch, do_cfg, lora, encoders, device)
    call = family.denoiser_call(pipe, inputs, height=first.height, width=first.width)
    timer.add("text_encode", started)

    started = time.perf_counter()
    seeds = [p.seed + i for p in batch for i in range(p.num_images)]
    scheduler = make_scheduler(
        first.scheduler, pipe.scheduler.config, seeds, flow_matching=family.flow_matching
    )
    per_request = [generators_for(p.seed, p.num_images) for p in batch]
    generators = [g for gens in per_request for g in gens]
    rows_shape = family.latent_shape(pipe, 1, first.height, first.width)
    family.set_timesteps(pipe, scheduler, first.steps, device, latent_shape=rows_shape)
    timesteps = timesteps_from(scheduler, first.start)
    start = prepare_start(pipe, family, batch, scheduler, timesteps, per_request, do_cfg)
    latents = start.latents
    if first.image is not None:
        timer.add("image_encode", started)
        started = time.perf_counter()
    step_kwargs = _step_kwargs(scheduler, generators)
    guidance = _guidance(batch, family, latents)
    copies = 2 if do_cfg else 1
    rows = _row_loras(batch, copies, device, dtype)
    factor = int(pipe.vae_scale_factor)
    shape = (latents.shape[0] * copies, first.height // factor, first.width // factor)
    with (
        _denoising(lora, batch, rows, shape, len(timesteps), timer),
        interruptible(denoiser, should_stop),
    ):
        for index, t in enumerate(timesteps):
            if should_stop():
                raise Cancelled
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            prediction = call(start.model_input(_scaled(scheduler, model_input, t)), t)
            if do_cfg:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance * (cond - uncond)
            latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
            latents = start.after_step(latents, index)
            on_step(index + 1, len(timesteps))
    timer.add("denoise", started)

    started = time.perf_counter()
    decoded = family.decode(pipe, latents, height=first.height, width=first.width)
    images: list[Image.Image] = pipe.image_processor.postprocess(
        decoded, output_type="pil", do_denormalize=[True] * len(decoded)
    )
    timer.add("decode", started)
    out, offset = [], 0
    for count in counts:
        out.append(images[offset : offset + count])
        offset += count
    return out


def sample(
    pipe: Pipeline,
    params: SampleParams,
    timer: StageTimer,
    should_stop: Callable[[], bool] = lambda: False,
    lora: LoRAModelManager | None = None,
) -> list[Image.Image]:
    return sample_batch(pipe, [params], timer, should_stop, lora)[0]
