"""Helpers the adapter serving tests share (DoRA, LyCORIS, merge; SDXL and the transformer families;
the DoRA trainer's export): plain diffusers drawing the server's SD1.x request, weights written by hand
into a reference pipeline for one drawing, and the check that a batch of mixed adapter rows equals each
request served alone. The server is ``tests/service/conftest.py``'s ``start_server``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.service.test_hotswap import REQUEST, generate, pixels


def prepared(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """``pipe`` quiet and on DDIM, as the server runs the request."""
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    return pipe


def sd_pipeline(model_dir: Path, **components: Any) -> StableDiffusionPipeline:
    """Plain diffusers' SD1.x pipeline of ``model_dir`` (``components`` replace its own), no safety
    checker, ``prepared``."""
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, **components, safety_checker=None, requires_safety_checker=False
    )
    return prepared(pipe)


def draw(pipe: StableDiffusionPipeline, **overrides: Any) -> np.ndarray:
    """The server's default request (``test_hotswap.REQUEST``, with ``overrides``) in plain diffusers,
    seeded as the server seeds it."""
    request = {**REQUEST, **overrides}
    image = pipe(
        request["prompt"],
        negative_prompt=request["negative_prompt"],
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        generator=generators_for(request["seed"], 1),
        output_type="pil",
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@contextmanager
def weights_written(
    components: Mapping[str, nn.Module], replaced: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Each ``component.module`` → weight of ``replaced`` written into ``components``' modules for the
    ``with`` block; the old weights are put back after it (reference pipelines are shared between
    drawings)."""

    def weight(module: str) -> torch.Tensor:
        component, path = module.split(".", 1)
        target = components[component].get_submodule(path).weight
        assert isinstance(target, torch.Tensor)
        return target

    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for module, new in replaced.items():
                target = weight(module)
                saved[module] = target.detach().clone()
                target.copy_(new.to(target.dtype))
        yield
    finally:
        with torch.no_grad():
            for module, old in saved.items():
                weight(module).copy_(old)


def send_default(server: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """``request`` over ``test_hotswap.REQUEST`` to ``/v1/generate``: the response body."""
    return generate(server, **request)


def assert_batch_equals_alone(
    start_server: Callable[..., Any],
    requests: Sequence[Mapping[str, Any]],
    *,
    window_ms: int,
    send: Callable[[Any, Mapping[str, Any]], dict[str, Any]] = send_default,
    warm: Callable[[Any], None] | None = None,
    **settings: Any,
) -> None:
    """Each request served alone (``max_batch_size`` 1), then all at once to a server that batches up
    to all of them within ``window_ms``, after ``warm`` made their adapters resident (so that no cold
    load splits the batch; default: each request sent once at 1 step): /metrics shows a batch of more
    than one, and each batched image equals the one served alone within 2/255. ``send(server, request)``
    → the response body (default: over ``test_hotswap.REQUEST``); ``settings``: both servers' other
    settings."""
    alone_server = start_server(**settings, max_batch_size=1)
    alone = [send(alone_server, r) for r in requests]
    alone_server.stop()
    server = start_server(**settings, max_batch_size=len(requests), batch_window_ms=window_ms)
    if warm is not None:
        warm(server)
    else:
        for r in requests:
            send(server, {**r, "steps": 1})
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        batched = list(pool.map(lambda r: send(server, r), requests))
    with server.client() as http:
        metrics = http.get("/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('loraswap_batch_size_bucket{le="1.0"}')]
    count = [line for line in metrics.splitlines() if line.startswith("loraswap_batch_size_count")]
    assert float(sizes[0].split()[-1]) < float(count[0].split()[-1]), "the requests were not batched"
    for one, many in zip(alone, batched, strict=True):
        assert np.abs(pixels(one["images"][0]) - pixels(many["images"][0])).max() <= 2
