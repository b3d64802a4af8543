"""Request scheduler names → diffusers schedulers built from the base model's own config.

Two tables, one per objective: ``SCHEDULERS`` for the noise/v-prediction families (SD1.x, SD2.x, SDXL)
and ``FLOW_SCHEDULERS`` for the flow-matching ones (SD3, Flux: ``ModelFamily.flow_matching``). A name
means the same sampler in both where one exists (``euler`` is Euler on either schedule). A name the base
model's objective has no sampler for is a 422 that lists the ones it has (``check_scheduler``).
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
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


def make_scheduler(name: str, base_config: Any, *, flow_matching: bool = False) -> Any:
    """A fresh scheduler per job: schedulers carry per-run state (step index, history)."""
    cls, overrides, _ = table(flow_matching)[name]
    accepted = inspect.signature(cls.__init__).parameters
    if "flow_shift" in accepted and "shift" in base_config:
        overrides = {"flow_shift": base_config["shift"], **overrides}  # DPM++/UniPC's name for it
    return cls.from_config(base_config, **overrides)


def a1111_label(name: str, *, flow_matching: bool = False) -> str:
    return table(flow_matching)[name][2]
