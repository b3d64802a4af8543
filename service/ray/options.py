"""The arguments of the Ray Serve application (``build_app``'s dict, ``serve run`` ``key=value`` pairs).

Keys named by ``RayOptions`` shape the fleet; every other key is a ``Settings`` field (the same ones as
the ``LORASWAP_*`` variables, which each replica also reads from its environment).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from basemodel.errors import ConfigError
from basemodel.settings import Settings, load_settings

Routing = Literal["affinity", "random"]


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


def _positive_float(name: str, value: Any, *, zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not (number >= 0 if zero else number > 0) or number != number:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return number


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas (1 ≤ MIN ≤ MAX)."""
    low, sep, high = str(text).partition(":")
    if not sep:
        raise ConfigError(f"autoscale must be MIN:MAX, got {text!r}", hint="For example --autoscale 1:4.")
    lo, hi = _positive_int("autoscale MIN", low), _positive_int("autoscale MAX", high)
    if lo > hi:
        raise ConfigError(f"autoscale MIN ({lo}) is above MAX ({hi})")
    return lo, hi


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    max_ongoing_requests: int = 4  # per replica; beyond it Ray routes elsewhere (or holds the request)
    routing: Routing = "affinity"
    spill: int = 2
    routing_stats_period_s: float = 1.0
    metrics_push_s: float = 2.0
    replica_cpus: float = 1.0
    replica_gpus: float | None = None  # None: 1 when the device is cuda (or auto with CUDA), else 0
    target_ongoing_requests: float = 2.0
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> RayOptions:
        args = dict(args or {})
        known = {f.name for f in fields(cls)} - {"overrides"}
        popped = {k: args.pop(k) for k in list(args) if k in known}
        given = {k: v for k, v in popped.items() if v is not None}
        routing = str(given.get("routing", "affinity"))
        if routing not in ("affinity", "random"):
            raise ConfigError(f"routing must be 'affinity' or 'random', got {routing!r}")
        autoscale = given.get("autoscale")
        if isinstance(autoscale, list | tuple):
            autoscale = f"{autoscale[0]}:{autoscale[1]}"
        gpus = given.get("replica_gpus")
        options = cls(
            replicas=_positive_int("replicas", given.get("replicas", 1)),
            autoscale=parse_autoscale(autoscale) if autoscale else None,
            max_ongoing_requests=_positive_int("max_ongoing_requests", given.get("max_ongoing_requests", 4)),
            routing=routing,  # type: ignore[arg-type]
            spill=int(_positive_float("spill", given.get("spill", 2), zero=True)),
            routing_stats_period_s=_positive_float(
                "routing_stats_period_s", given.get("routing_stats_period_s", 1.0)
            ),
            metrics_push_s=_positive_float("metrics_push_s", given.get("metrics_push_s", 2.0)),
            replica_cpus=_positive_float("replica_cpus", given.get("replica_cpus", 1.0), zero=True),
            replica_gpus=None if gpus is None else _positive_float("replica_gpus", gpus, zero=True),
            target_ongoing_requests=_positive_float(
                "target_ongoing_requests", given.get("target_ongoing_requests", 2.0)
            ),
            overrides={k: v for k, v in args.items() if v is not None},
        )
        options.settings()  # invalid settings fail here, in the driver, not in every replica
        return options

    def settings(self) -> Settings:
        return load_settings(**self.overrides)

    def to_args(self) -> dict[str, Any]:
        """The dict ``from_args`` reads back (what the deployments are bound with)."""
        args: dict[str, Any] = dict(self.overrides)
        for f in fields(self):
            if f.name != "overrides" and getattr(self, f.name) is not None:
                args[f.name] = getattr(self, f.name)
        return args

    def gpus(self, settings: Settings) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        if settings.device == "cuda":
            return 1.0
        if settings.device == "auto":
            import torch

            return 1.0 if torch.cuda.is_available() else 0.0
        return 0.0
