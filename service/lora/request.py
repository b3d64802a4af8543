"""What a request asks for, what it resolved to, and A1111's ``<lora:name:weight>`` prompt syntax.

An adapter has one ``scale`` and optional per-component weights: ``denoiser_scale`` (the UNet or the
transformer; ``unet_scale`` is its older name and stays an alias) and ``text_encoder_scale`` (ComfyUI's
``strength_model`` / ``strength_clip``), each ``scale`` when absent. A1111's tag forms map onto them:
``<lora:id:w>`` is ``scale = w``; ``<lora:id:te:unet>`` and ``<lora:id:te=…:unet=…>`` are ``scale = te``
(so the text encoders get ``te``) and ``denoiser_scale = unet`` (A1111: the UNet multiplier defaults to
the text-encoder one). Every weight goes through ``check_scale``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidAdapterRef
from adapters.metadata import check_scale
from adapters.records import AdapterVersion
from adapters.refs import MAX_VERSION, parse_ref, validate_id
from basemodel.errors import ValidationFailed
from service.lora.weights import DeviceAdapter

# <lora:id:0.8>, <lora:id@3:0.8>, <lora:id>, <lora:id:0.8:0.5>, <lora:id:te=0.8:unet=0.5> (A1111 syntax)
PROMPT_TAG = re.compile(r"<lora:(?P<name>[^:>]+)(?::(?P<weight>[^>]*))?>", re.IGNORECASE)
TAG_KEYS = ("te", "unet")  # A1111's named multipliers (its dyn= is not supported)


@dataclass(frozen=True)
class AdapterRequest:
    adapter_id: str
    version: int | None = None
    scale: float | None = None
    denoiser_scale: float | None = None
    text_encoder_scale: float | None = None

    @property
    def unet_scale(self) -> float | None:
        """``denoiser_scale`` under its older name."""
        return self.denoiser_scale

    @property
    def ref(self) -> str:
        return f"{self.adapter_id}@{self.version}" if self.version is not None else self.adapter_id


@dataclass(frozen=True)
class AppliedAdapter:
    """An adapter resolved to an immutable version, ready on the device, with its final scale."""

    version: AdapterVersion
    adapter: DeviceAdapter
    scale: float
    stale: bool = False  # a remembered 'latest' served while the store could not confirm it
    denoiser_scale: float | None = None  # None: ``scale``
    text_encoder_scale: float | None = None  # None: ``scale``

    @property
    def denoiser_weight(self) -> float:
        """The weight applied while the denoiser (UNet or transformer) runs."""
        return self.scale if self.denoiser_scale is None else self.denoiser_scale

    @property
    def unet_scale(self) -> float | None:
        """``denoiser_scale`` under its older name."""
        return self.denoiser_scale

    @property
    def unet_weight(self) -> float:
        """``denoiser_weight`` under its older name."""
        return self.denoiser_weight

    @property
    def text_encoder_weight(self) -> float:
        """The weight applied while the text encoder(s) run (prompt encoding)."""
        return self.scale if self.text_encoder_scale is None else self.text_encoder_scale

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "id": self.version.adapter_id,
            "version": self.version.version,
            "sha256": self.version.sha256,
            "scale": self.scale,
        }
        if self.denoiser_scale is not None:  # echoed under both names (unet_scale: the older one)
            described["denoiser_scale"] = self.denoiser_scale
            described["unet_scale"] = self.denoiser_scale
        if self.text_encoder_scale is not None:
            described["text_encoder_scale"] = self.text_encoder_scale
        if self.stale:
            described["stale"] = True
        return described


def adapter_request(
    adapter_id: str,
    version: int | None,
    scale: float | None,
    *,
    field: str,
    denoiser_scale: float | None = None,
    text_encoder_scale: float | None = None,
    unet_scale: float | None = None,
) -> AdapterRequest:
    """The one validation of an adapter named by a request: JSON ``adapters``, prompt tags, preload.

    Id as ``adapters.refs.validate_id``, version 1..``MAX_VERSION``, every weight (``scale``,
    ``denoiser_scale`` or its alias ``unet_scale``, ``text_encoder_scale``) as ``check_scale`` (finite,
    −4..4); the two names of the denoiser weight with different values, or anything else → 422 naming
    ``field``.
    """
    if denoiser_scale is not None and unet_scale is not None and denoiser_scale != unet_scale:
        raise ValidationFailed(
            f"{field}: denoiser_scale {denoiser_scale:g} and unet_scale {unet_scale:g} disagree "
            f"for {adapter_id!r}; unet_scale is another name for denoiser_scale",
            detail={"field": field},
            hint="Send one of them.",
        )
    denoiser_scale = unet_scale if denoiser_scale is None else denoiser_scale
    try:
        validate_id(adapter_id)
    except InvalidAdapterRef as exc:
        exc.detail["field"] = field
        raise
    if version is not None and (isinstance(version, bool) or not 1 <= version <= MAX_VERSION):
        raise InvalidAdapterRef(
            f"{field}: version must be from 1 to {MAX_VERSION}, got {version!r}",
            reason="bad_ref",
            detail={"field": field},
        )

    def checked(value: float | None, what: str) -> float | None:
        return None if value is None else check_scale(value, field=field, what=f"{what} of {adapter_id!r}")

    return AdapterRequest(
        adapter_id,
        version,
        checked(scale, "the weight"),
        checked(denoiser_scale, "the denoiser weight (the UNet weight; the transformer's on SD3/Flux)"),
        checked(text_encoder_scale, "the text-encoder weight"),
    )


def _tag_weights(weight: str) -> tuple[float | None, float | None]:
    """A tag's weights → (scale, denoiser_scale): ``w``, ``te:unet``, ``te=…:unet=…`` (A1111's forms)."""
    if not weight:
        return None, None
    positional: list[float] = []
    named: dict[str, float] = {}
    for part in weight.split(":"):
        key, equals, value = part.partition("=")
        if equals:
            key = key.strip().lower()
            if key not in TAG_KEYS or key in named:
                raise ValueError(part)
            named[key] = float(value)
        else:
            positional.append(float(part))
    if len(positional) > len(TAG_KEYS):
        raise ValueError(weight)
    values = dict(zip(TAG_KEYS, positional, strict=False)) | named
    return values.get("te"), values.get("unet")


def extract_prompt_adapters(prompt: str) -> tuple[str, list[AdapterRequest]]:
    """Strip ``<lora:…>`` tags from ``prompt`` and return them as adapter requests (``adapter_request``)."""
    found: list[AdapterRequest] = []
    for match in PROMPT_TAG.finditer(prompt):
        tag = match.group(0)
        weight = (match["weight"] or "").strip()
        try:
            ref = parse_ref(match["name"].strip().lower())
            scale, denoiser_scale = _tag_weights(weight)
        except (ValueError, InvalidAdapterRef):
            raise ValidationFailed(
                f"bad prompt tag {tag!r}",
                detail={"field": "prompt"},
                hint="Write <lora:ID:WEIGHT>, <lora:ID@VERSION:WEIGHT>, <lora:ID:TE_WEIGHT:UNET_WEIGHT> "
                "or <lora:ID:te=TE_WEIGHT:unet=UNET_WEIGHT>.",
            ) from None
        try:
            found.append(
                adapter_request(
                    ref.adapter_id, ref.version, scale, field="prompt", denoiser_scale=denoiser_scale
                )
            )
        except ValidationFailed as exc:
            raise ValidationFailed(
                f"prompt tag {tag!r}: {exc.message}", detail=exc.detail, hint=exc.hint
            ) from None
    if not found:
        return prompt, []
    return " ".join(PROMPT_TAG.sub(" ", prompt).split()), found
