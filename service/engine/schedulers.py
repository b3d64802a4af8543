"""Request scheduler names → diffusers schedulers built from the base model's own config.

The SDE samplers draw fresh noise at every step, and it comes from the request's seed, one stream per
image (so image i of a request equals the same request with seed + i alone, as for the initial noise):

- ``dpmpp_2m_sde`` / ``_karras`` (A1111 ``DPM++ 2M SDE [Karras]``): ``DPMSolverMultistepScheduler``
  with ``algorithm_type="sde-dpmsolver++"``, whose ``step`` takes the per-image CPU generators, as in
  diffusers' pipelines;
- ``dpmpp_sde`` / ``_karras`` (A1111 ``DPM++ SDE [Karras]``): ``DPMSolverSDEScheduler``, whose noise is
  a Brownian tree (``torchsde``, the ``sde`` extra) seeded by ``noise_sampler_seed``: one seed per image,
  ``seed + i`` (``make_scheduler(..., seeds=…)``). Without ``torchsde`` they are refused (422).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from importlib.util import find_spec
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from basemodel.errors import ValidationFailed

# name → (class, config overrides, A1111 sampler label for PNG metadata)
SCHEDULERS: dict[str, tuple[type[Any], dict[str, Any], str]] = {
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    # SDE samplers (module docstring): noise from each image's seed
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        "DPM++ 2M SDE",
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M SDE Karras",
    ),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}, "DPM++ SDE"),  # needs torchsde (NEEDS)
    "dpmpp_sde_karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True}, "DPM++ SDE Karras"),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS"),
    "heun": (HeunDiscreteScheduler, {}, "Heun"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC"),
}

NEEDS = {"dpmpp_sde": "torchsde", "dpmpp_sde_karras": "torchsde"}
"""Schedulers that need a package beyond the core ones (the ``sde`` extra)."""


def available(name: str) -> bool:
    needed = NEEDS.get(name)
    return needed is None or find_spec(needed) is not None


def check_available(name: str) -> None:
    """422 for a scheduler whose package is not installed (before the request is queued)."""
    if not available(name):
        raise ValidationFailed(
            f"scheduler {name!r} ({a1111_label(name)}) needs the {NEEDS[name]!r} package, which is not "
            "installed on this server",
            detail={"field": "scheduler", "reason": "scheduler_unavailable", "package": NEEDS[name]},
            hint="Pick another scheduler, or install it on the server: pip install 'loraswap[sde]'.",
        )


def make_scheduler(name: str, base_config: Any, seeds: Sequence[int] = ()) -> Any:
    """A fresh scheduler per job: schedulers carry per-run state (step index, history). ``seeds``: the
    batch's per-image seeds, for schedulers that seed their own noise (``noise_sampler_seed``)."""
    cls, overrides, _ = SCHEDULERS[name]
    if seeds and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        overrides = {**overrides, "noise_sampler_seed": list(seeds)}
    return cls.from_config(base_config, **overrides)


def a1111_label(name: str) -> str:
    return SCHEDULERS[name][2]
