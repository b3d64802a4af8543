"""Request scheduler names → diffusers schedulers built from the base model's own config.

Two tables, one per objective: ``SCHEDULERS`` for the noise/v-prediction families (SD1.x, SD2.x, SDXL)
and ``FLOW_SCHEDULERS`` for the flow-matching ones (SD3, Flux: ``ModelFamily.flow_matching``). A name
means the same sampler in both where one exists (``euler`` is Euler on either schedule). A name the base
model's objective has no sampler for is a 422 that lists the ones it has (``check_scheduler``).

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
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from basemodel.errors import ValidationFailed

Entry = tuple[type[Any], dict[str, Any], str]  # (class, config overrides, A1111 sampler label)

# name → (class, config overrides, A1111 sampler label for PNG metadata)
SCHEDULERS: dict[str, Entry] = {
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

# The flow-matching samplers diffusers ships, built from the model's FlowMatchEuler config (its
# ``shift`` and dynamic-shift settings carry over). DPM++ 2M and UniPC run on flow sigmas with the
# velocity prediction (``flow_prediction``), as diffusers configures them for flow models; FlowMatchHeun
# takes no custom sigmas nor ``mu``, so it uses the config's static ``shift``.
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS: dict[str, Entry] = {
    "euler": (FlowMatchEulerDiscreteScheduler, {}, "Euler"),
    "heun": (FlowMatchHeunDiscreteScheduler, {}, "Heun"),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {**FLOW, "algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "unipc": (UniPCMultistepScheduler, FLOW, "UniPC"),
}
NAMES = tuple(dict.fromkeys((*SCHEDULERS, *FLOW_SCHEDULERS)))  # every name a request may send


def table(flow_matching: bool) -> dict[str, Entry]:
    return FLOW_SCHEDULERS if flow_matching else SCHEDULERS


def check_scheduler(name: str, *, flow_matching: bool, family: str) -> None:
    """422 when the base model's objective has no sampler called ``name``, listing those it has."""
    available = table(flow_matching)
    if name in available:
        return
    objective = "flow matching" if flow_matching else "noise prediction (DDPM schedules)"
    raise ValidationFailed(
        f"sampler {name!r} does not support {objective}, which the base model's family, {family}, uses",
        detail={"field": "scheduler", "scheduler": name, "available": list(available)},
        hint=f"Use one of: {', '.join(available)}.",
    )


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


def make_scheduler(
    name: str, base_config: Any, seeds: Sequence[int] = (), *, flow_matching: bool = False
) -> Any:
    """A fresh scheduler per job: schedulers carry per-run state (step index, history). ``seeds``: the
    batch's per-image seeds, for schedulers that seed their own noise (``noise_sampler_seed``)."""
    cls, overrides, _ = table(flow_matching)[name]
    accepted = inspect.signature(cls.__init__).parameters
    if seeds and "noise_sampler_seed" in accepted:
        overrides = {**overrides, "noise_sampler_seed": list(seeds)}
    if "flow_shift" in accepted and "shift" in base_config:
        overrides = {"flow_shift": base_config["shift"], **overrides}  # DPM++/UniPC's name for it
    return cls.from_config(base_config, **overrides)


def a1111_label(name: str, *, flow_matching: bool = False) -> str:
    return table(flow_matching)[name][2]
