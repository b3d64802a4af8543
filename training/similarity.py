"""Dataset-similarity measures that need no downloaded weights.

Generated samples (base model vs base + adapter, same prompts and seeds) are compared with the
validation set (the training set when there is none) as *sets*:

* **latent statistics distance** (the primary measure, ``dataset_similarity.score``): the sampler's
  output latents against the validation images' latents (the base VAE's encoding, the same space the
  UNet is trained in). Distance = ``(|Δ channel means| + |Δ channel stds| + RMSE of the 4×4 pooled
  mean latent) / std of the reference latents`` (each term an RMS over the latent channels). 0 means
  the same first- and second-order statistics and spatial layout; it is scale-free across models.
  SD latents are roughly a ¼-resolution colour image, so this is "low-resolution pixel statistics"
  measured where the model works; it does not depend on the VAE decoder's quality.
* **pixel distance** (secondary): on decoded RGB images, the total-variation distance between the
  sets' joint colour histograms (8×8×8 bins, 0…1) averaged with the RMSE of their 8×8 mean images
  (0…1). Reported against the validation images and against their VAE round trip (encode→decode):
  with a trained VAE the two agree; with a random one (the embedded tiny-sd) only the latter is
  reachable at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HIST_BINS = 8
LOWRES = 8
LATENT_POOL = 4


def colour_histogram(images: Sequence[Image.Image], bins: int = HIST_BINS) -> np.ndarray:
    """Joint RGB histogram of all pixels of the set, normalised to sum 1."""
    counts = np.zeros(bins**3, dtype=np.float64)
    for img in images:
        q = (np.asarray(img.convert("RGB"), dtype=np.int64) * bins) // 256
        idx = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
        counts += np.bincount(idx.ravel(), minlength=bins**3)
    return counts / max(1.0, counts.sum())


def lowres_mean(images: Sequence[Image.Image], size: int = LOWRES) -> np.ndarray:
    """Mean of the images reduced to ``size``×``size`` (values 0…1)."""
    small = [
        np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255
        for img in images
    ]
    return np.mean(small, axis=0)


def pixel_distance(samples: Sequence[Image.Image], references: Sequence[Image.Image]) -> dict[str, float]:
    tv = 0.5 * float(np.abs(colour_histogram(samples) - colour_histogram(references)).sum())
    rmse = float(np.sqrt(np.mean((lowres_mean(samples) - lowres_mean(references)) ** 2)))
    return {"histogram_tv": round(tv, 6), "lowres_rmse": round(rmse, 6), "score": round((tv + rmse) / 2, 6)}


def _flat_channels(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([lat.float().reshape(lat.shape[0], -1) for lat in latents], dim=1)  # (C, all positions)


def latent_distance(samples: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> dict[str, float]:
    """Each latent is ``(C, h, w)``; sizes may differ (buckets)."""
    s, r = _flat_channels(samples), _flat_channels(references)
    scale = float(r.std()) or 1.0
    d_mean = float((s.mean(1) - r.mean(1)).pow(2).mean().sqrt())
    d_std = float((s.std(1) - r.std(1)).pow(2).mean().sqrt())
    pool_s = torch.stack([F.adaptive_avg_pool2d(x.float()[None], LATENT_POOL)[0] for x in samples]).mean(0)
    pool_r = torch.stack([F.adaptive_avg_pool2d(x.float()[None], LATENT_POOL)[0] for x in references]).mean(0)
    d_layout = float((pool_s - pool_r).pow(2).mean().sqrt())
    return {
        "channel_mean": round(d_mean / scale, 6),
        "channel_std": round(d_std / scale, 6),
        "layout": round(d_layout / scale, 6),
        "score": round((d_mean + d_std + d_layout) / scale, 6),
        "reference_std": round(scale, 6),
    }


def compare(base: float, adapter: float) -> dict[str, Any]:
    return {
        "base": base,
        "adapter": adapter,
        "adapter_closer": adapter < base,
        "relative_improvement": round((base - adapter) / base, 4) if base else 0.0,
    }
