"""``BaseIdentity``: the small view of a base model that adapter registration needs.

Name, content fingerprint and architecture descriptor — not a pipeline. ``from_spec`` computes it
cheaply for diffusers folders (tiny-sd included): the family's LoRA components (UNet, text
encoder(s)) are instantiated on PyTorch's ``meta`` device (shapes, no weights), and the fingerprint is
``basemodel``'s cached one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.metadata import BaseModelInfo
from basemodel.fingerprint import Architecture, fingerprint

if TYPE_CHECKING:
    from basemodel.loader import BaseModel


@dataclass(frozen=True)
class BaseIdentity:
    name: str
    fingerprint: str
    architecture: Architecture
    prediction_type: str = "epsilon"
    """What the UNet predicts (its scheduler config's ``prediction_type``; SD2 768-v: ``v_prediction``):
    it names the export's modelspec architecture and kohya base version."""

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
            prediction_type=self.prediction_type,
        )

    @classmethod
    def from_base_model(cls, base: BaseModel) -> BaseIdentity:
        return cls(
            name=base.name,
            fingerprint=base.fingerprint,
            architecture=base.architecture,
            prediction_type=base.family.prediction_type(base.pipe.scheduler.config),
        )

    @classmethod
    def from_spec(cls, spec: str, models_dir: Path, components: Path | None = None) -> BaseIdentity:
        """Identity of ``--base-model`` ``spec`` without loading weights when the layout allows it:
        a diffusers folder's modules are built from its configs on PyTorch's ``meta`` device.
        ``components``: what completes a single-file SD3/Flux checkpoint (``--base-components``)."""
        from basemodel.families import detect_folder, read_index, read_json
        from basemodel.loader import resolve_base_model

        ref = resolve_base_model(spec, models_dir)
        if ref.kind in ("tiny", "diffusers"):
            family = detect_folder(ref.path)
            architecture = family.meta_architecture(ref.path, read_index(ref.path))
            scheduler = ref.path / "scheduler" / "scheduler_config.json"
            prediction = family.prediction_type(read_json(scheduler) if scheduler.is_file() else {})
            return cls(
                name=ref.name,
                fingerprint=fingerprint(ref.path),
                architecture=architecture,
                prediction_type=prediction,
            )
        from basemodel.loader import load_base_model

        base = load_base_model(spec, models_dir, device="cpu", dtype="fp32", components=components)
        return cls.from_base_model(base)
