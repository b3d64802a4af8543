"""Which way a denoising batch applies its adapters: ``none``, ``fused`` or ``hooked``.

The rules, in order (``LORASWAP_LORA_PATH``: ``auto``, the default; ``hooked`` or ``fused`` force one):

1. No row of the batch has an adapter → ``none``: no hook is installed and any fused set is restored
   first, so the base model runs at its own speed on its own weights.
2. Rows differ (other adapters, or the same adapters at other scales) → ``hooked`` (the row-indexed
   hooks); forcing ``fused`` cannot fuse a mixed batch.
3. The set's fused tensors do not fit ``LORASWAP_LORA_FUSE_BUDGET_MB`` → ``hooked``.
4. Forced ``hooked`` / ``fused`` → that path.
5. ``auto``: the set is fused already (the previous batch used it: *sticky*) → ``fused`` at no cost.
   Otherwise fuse when the batch's remaining denoising work outweighs fusing: ``steps × (hooked step −
   plain step) ≥ fuse + restore``, all measured on this server (moving averages: fuse seconds per fused
   parameter, restore seconds, and the seconds of a hooked and of a hook-free UNet step per batch shape
   — rows × latent height × width). A parked set (fused earlier, restored, tensors kept) costs two
   pointer swaps. While any of these is still unmeasured the policy fuses, which measures it.

The text encoder always runs with hooks: it runs once per request (not once per step), so fusing it
would cost more than its hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

PathName = Literal["none", "fused", "hooked"]
PathMode = Literal["auto", "hooked", "fused"]
PATHS: tuple[PathName, ...] = get_args(PathName)
Shape = tuple[int, int, int]  # rows (latents × CFG copies), latent height, latent width


@dataclass
class Ewma:
    """An exponentially weighted moving average; ``None`` until the first sample."""

    weight: float = 0.3
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - self.weight) * self.value + self.weight * sample


@dataclass
class Choice:
    path: PathName
    reason: str


@dataclass
class PathPolicy:
    mode: PathMode = "auto"
    fuse_s_per_param: Ewma = field(default_factory=Ewma)
    restore_s: Ewma = field(default_factory=Ewma)
    step_s: dict[tuple[bool, Shape], Ewma] = field(default_factory=dict)  # (hooked?, shape) → seconds

    def choose(
        self,
        *,
        wanted: bool,
        uniform: bool,
        fusable: bool = True,
        fits: bool,
        fused_now: bool,
        parked: bool,
        parameters: int,
        steps: int,
        shape: Shape,
    ) -> Choice:
        if not wanted:
            return Choice("none", "no adapter")
        if not uniform:
            return Choice("hooked", "mixed batch")
        if not fusable:
            return Choice("hooked", "changes biases")  # only weights are fused; a forced 'fused' too
        if not fits:
            return Choice("hooked", "over the fuse budget")
        if self.mode != "auto":
            return Choice(self.mode, "forced")
        if fused_now:
            return Choice("fused", "already fused")
        cost = self.fuse_cost(parameters, parked)
        saving = self.hook_cost(shape)
        if cost is None or saving is None:
            return Choice("fused", "unmeasured")
        if steps * saving >= cost:
            return Choice("fused", "pays back")
        return Choice("hooked", "would not pay back")

    def fuse_cost(self, parameters: int, parked: bool) -> float | None:
        """Expected seconds to fuse this set and restore it later."""
        restore = self.restore_s.value
        if restore is None:
            return None
        if parked:
            return 2 * restore
        per_param = self.fuse_s_per_param.value
        return None if per_param is None else per_param * parameters + restore

    def hook_cost(self, shape: Shape) -> float | None:
        """Expected extra seconds per UNet step with hooks, at this batch shape."""
        hooked, plain = self.step_s.get((True, shape)), self.step_s.get((False, shape))
        if hooked is None or plain is None or hooked.value is None or plain.value is None:
            return None
        return max(0.0, hooked.value - plain.value)

    # -- measurements -------------------------------------------------------------------------------
    def observe_fuse(self, seconds: float, parameters: int) -> None:
        if parameters:
            self.fuse_s_per_param.add(seconds / parameters)

    def observe_restore(self, seconds: float) -> None:
        self.restore_s.add(seconds)

    def observe_step(self, path: PathName, shape: Shape, seconds: float) -> None:
        self.step_s.setdefault((path == "hooked", shape), Ewma()).add(seconds)
