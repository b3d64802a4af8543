"""What one request may ask for: the server's limits, derived from the loaded model unless set.

A denoising step costs about width × height (the UNet's convolutions; its attention grows faster
still, with the square of the token count), and a request holds the only worker for steps × images
of them. So the limits that matter follow the model's native size N (512 for SD1.5, 1024 for SDXL,
32 for tiny-sd) rather than fixed pixel counts:

- a side of at most ``SIDE_MULTIPLE`` × N (3×: a 1:3 panorama at the native pixel count fits; the
  models draw repeated subjects well before that, and A1111's hires fix rarely goes past 2×);
- at most ``PIXEL_MULTIPLE`` × N² pixels (4×: a square of twice the native side, the usual hires-fix
  target, e.g. 1024×1024 on SD1.5, 2048×2048 on SDXL); a step at 4× the pixels already costs ≥ 4× the
  native step, and the attention of the highest-resolution blocks 16×;
- a cost, width × height × steps × num_images ("pixel-steps"), of at most ``COST_NATIVE_STEPS`` × N²:
  1200 steps of a native-size image, i.e. ``max_steps`` (150) × ``max_images`` (8) at the native size,
  so nothing the step and image limits allow at the native size is refused, while 4× the pixels is
  held to 300 steps in all (150 steps × 2 images, or 37 × 8).

Every one is overridable (``LORASWAP_MAX_WIDTH``, ``_MAX_HEIGHT``, ``_MAX_OUTPUT_PIXELS``,
``_MAX_COST_PIXEL_STEPS``); ``/readyz`` shows the limits in effect and which were derived.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from basemodel.errors import LimitExceeded
from basemodel.settings import Settings

SIDE_MULTIPLE = 3
PIXEL_MULTIPLE = 4
COST_NATIVE_STEPS = 1200


@dataclass(frozen=True)
class Limits:
    native_size: int
    max_width: int
    max_height: int
    max_output_pixels: int
    max_steps: int
    max_images: int
    max_cost_pixel_steps: int
    derived: tuple[str, ...] = ()
    """The limits that follow the model (their setting was left unset)."""

    @classmethod
    def for_model(cls, settings: Settings, native_size: int) -> Limits:
        defaults = {
            "max_width": SIDE_MULTIPLE * native_size,
            "max_height": SIDE_MULTIPLE * native_size,
            "max_output_pixels": PIXEL_MULTIPLE * native_size**2,
            "max_cost_pixel_steps": COST_NATIVE_STEPS * native_size**2,
        }
        chosen = {name: getattr(settings, name) for name in defaults}
        return cls(
            native_size=native_size,
            max_steps=settings.max_steps,
            max_images=settings.max_images,
            derived=tuple(name for name, value in chosen.items() if value is None),
            **{name: defaults[name] if value is None else value for name, value in chosen.items()},
        )

    def check(self, width: int, height: int, steps: int, num_images: int) -> None:
        """422 ``limit_exceeded`` for the first limit the request is over."""
        pixels = width * height
        cost = pixels * steps * num_images
        checks = (
            ("width", width, "max_width", self.max_width, f"width {width}"),
            ("height", height, "max_height", self.max_height, f"height {height}"),
            ("steps", steps, "max_steps", self.max_steps, f"steps {steps}"),
            ("num_images", num_images, "max_images", self.max_images, f"num_images {num_images}"),
            (
                "width",
                pixels,
                "max_output_pixels",
                self.max_output_pixels,
                f"{width}×{height} = {pixels:,} pixels",
            ),
            (
                "steps",
                cost,
                "max_cost_pixel_steps",
                self.max_cost_pixel_steps,
                f"cost {width}×{height} px × {steps} steps × {num_images} images = {cost:,} pixel-steps",
            ),
        )
        for field, value, setting, limit, what in checks:
            if value > limit:
                raise LimitExceeded(
                    f"{what} exceeds the server's limit of {limit:,} ({setting}{self._origin(setting)})",
                    detail={"field": field, "setting": setting, "limit": limit, "value": value},
                )

    def _origin(self, setting: str) -> str:
        if setting not in self.derived:
            return ""
        return f", derived from the model's native size {self.native_size}"

    def to_json(self) -> dict[str, object]:
        body = asdict(self)
        body["derived"] = list(self.derived)
        return body
