"""Stable Diffusion 2.x: SD1.x's pipeline and sampling with an OpenCLIP ViT-H text encoder (1024 wide).

SD2.0/2.1 768-v predict ``v`` (their scheduler config says ``prediction_type: v_prediction``, which
every scheduler the server builds inherits); the 512 "base" models predict noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from basemodel.families.sd1 import SD1
from basemodel.families.values import ModelSignals

V_PREDICTION = "v_prediction"


class SD2(SD1):
    name = "sd2"
    label = "SD2.x"
    default_resolution = 768
    context_width = 1024
    checkpoint_markers = ("model.diffusion_model.", "cond_stage_model.model.")
    checkpoint_description = "an SD2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.* keys)"
    modelspec = "stable-diffusion-v2-512"
    kohya_version = "sd_v2"

    def claims(self, signals: ModelSignals) -> bool:
        """SD1.x's pipeline with cross-attention 1024 wide."""
        return super().claims(signals) and signals.unet.get("cross_attention_dim") == self.context_width

    def modelspec_architecture(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        arch = "stable-diffusion-v2-768-v" if prediction_type == V_PREDICTION else self.modelspec
        return f"{arch}/lora"

    def kohya_base_version(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        return self.kohya_version + ("_v" if prediction_type == V_PREDICTION else "")
