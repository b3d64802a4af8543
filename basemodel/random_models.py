"""Every random-weights test model by name, and by family (``loraswap model init-tiny --random
--family F``): built from a seed, byte-identical per seed, nothing downloaded.

``tiny-sd-random`` and ``tiny-sd-inpaint-random`` are SD1.x's (``basemodel.tiny``); the others live in
their family packages (``basemodel.families.<family>.tiny``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from basemodel.families.flux.tiny import FLUX_RANDOM_NAME, save_tiny_flux
from basemodel.families.sd3.tiny import SD3_RANDOM_NAME, save_tiny_sd3
from basemodel.families.sdxl.tiny import SDXL_RANDOM_NAME, save_tiny_sdxl
from basemodel.tiny import DEFAULT_SEED, INPAINT_RANDOM_NAME, RANDOM_NAME, save_tiny, save_tiny_inpaint

# family → its random-weights test model
RANDOM_MODELS = {
    "sd1": RANDOM_NAME,
    "sdxl": SDXL_RANDOM_NAME,
    "sd3": SD3_RANDOM_NAME,
    "flux": FLUX_RANDOM_NAME,
}
BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    RANDOM_NAME: save_tiny,
    INPAINT_RANDOM_NAME: save_tiny_inpaint,
    SDXL_RANDOM_NAME: save_tiny_sdxl,
    SD3_RANDOM_NAME: save_tiny_sd3,
    FLUX_RANDOM_NAME: save_tiny_flux,
}
RANDOM_SPECS = tuple(BUILDERS)  # every random-weights spec


def save_random(name: str, output: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build the random model ``name`` (one of ``RANDOM_SPECS``) from ``seed`` into ``output``."""
    return BUILDERS[name](output, seed)


def ensure_random_tiny(models_dir: Path, seed: int = DEFAULT_SEED, name: str = RANDOM_NAME) -> Path:
    """The random model ``name`` under ``models_dir``, built from ``seed`` on first use."""
    target = Path(models_dir) / name
    if not (target / "model_index.json").is_file():
        save_random(name, target, seed)
    return target
