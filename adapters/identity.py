"""``BaseIdentity``: the small view of a base model that adapter registration needs.

Name, content fingerprint and architecture descriptor — not a pipeline. ``from_spec`` computes it
cheaply for diffusers folders (tiny-sd included): the UNet and text encoder are instantiated on
PyTorch's ``meta`` device (shapes, no weights), and the fingerprint is ``basemodel``'s cached one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from adapters.metadata import BaseModelInfo
from basemodel.fingerprint import Architecture, architecture_of, fingerprint

if TYPE_CHECKING:
    from basemodel.loader import BaseModel


@dataclass(frozen=True)
class BaseIdentity:
    name: str
    fingerprint: str
    architecture: Architecture

    @property
    def architecture_id(self) -> str:
        return self.architecture.architecture_id

    @property
    def family(self) -> str:
        return self.architecture.family

    def info(self) -> BaseModelInfo:
        return BaseModelInfo(
            name=self.name,
            fingerprint=self.fingerprint,
            architecture_id=self.architecture_id,
            family=self.family,
        )

    @classmethod
    def from_base_model(cls, base: BaseModel) -> BaseIdentity:
        return cls(name=base.name, fingerprint=base.fingerprint, architecture=base.architecture)

    @classmethod
    def from_spec(cls, spec: str, models_dir: Path) -> BaseIdentity:
        """Identity of ``--base-model`` ``spec`` without loading weights when the layout allows it."""
        from basemodel.loader import resolve_base_model

        ref = resolve_base_model(spec, models_dir)
        if ref.kind in ("tiny", "diffusers") and _is_sd_folder(ref.path):
            return cls(
                name=ref.name, fingerprint=fingerprint(ref.path), architecture=_meta_architecture(ref.path)
            )
        from basemodel.loader import load_base_model

        return cls.from_base_model(load_base_model(spec, models_dir, device="cpu", dtype="fp32"))


def _is_sd_folder(path: Path) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(
        index.get("unet") == ["diffusers", "UNet2DConditionModel"]
        and index.get("text_encoder") == ["transformers", "CLIPTextModel"]
    )


def _meta_architecture(path: Path) -> Architecture:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from basemodel.loader import family_of

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
    family = family_of(cast(Any, SimpleNamespace(unet=unet)))
    return architecture_of(unet, text_encoder, family=family)
