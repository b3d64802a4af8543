"""Request scheduler names → diffusers schedulers built from the base model's own config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

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
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS"),
    "heun": (HeunDiscreteScheduler, {}, "Heun"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC"),
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler per job: schedulers carry per-run state (step index, history)."""
    cls, overrides, _ = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


def a1111_label(name: str) -> str:
    return SCHEDULERS[name][2]
