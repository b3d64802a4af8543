"""``ModelFamily``: everything that differs between SD1.x, SD2.x and SDXL, behind one interface.

A family says which diffusers pipeline class loads it, which components carry LoRA-targetable
modules (the UNet and one or two text encoders), its default resolution, where its prediction type
comes from, how a prompt becomes what the UNet takes (``encode``: hidden states plus, for SDXL,
pooled text embeddings and size/crop time ids), how latents are decoded, how the trainer conditions
the UNet (``tokenize``, ``training_text``, ``size_conditioning``, ``training_inputs``: what
``loraswap train`` encodes and caches per caption and per image), and the names other tools use for
it (kohya key prefixes, the SAI modelspec architecture, kohya's ``ss_base_model_version``).
Code outside ``basemodel/families/`` asks the family object instead of testing its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from basemodel.fingerprint import Architecture, architecture_of

if TYPE_CHECKING:
    from basemodel.textual_inversion import Embedding


@dataclass(frozen=True)
class UNetInputs:
    """What the UNet takes besides latents and timestep, for some rows of a batch.

    ``hidden`` is ``encoder_hidden_states`` ``[rows, tokens, width]``; ``added`` is diffusers'
    ``added_cond_kwargs`` (SDXL: ``text_embeds`` ``[rows, projection]`` and ``time_ids`` ``[rows, 6]``),
    empty for families without added conditioning.
    """

    hidden: torch.Tensor
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[UNetInputs]) -> UNetInputs:
        """Rows of several inputs stacked in order (every part has the same ``added`` keys)."""
        keys = list(parts[0].added)
        return UNetInputs(
            torch.cat([p.hidden for p in parts]),
            {key: torch.cat([p.added[key] for p in parts]) for key in keys},
        )

    def unet_kwargs(self) -> dict[str, Any]:
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": dict(self.added) or None}


@dataclass(frozen=True)
class Conditioning:
    """One request's encoded prompt: ``cond`` rows and, under classifier-free guidance, ``uncond``."""

    cond: UNetInputs
    uncond: UNetInputs | None


@dataclass(frozen=True)
class ModelSignals:
    """What detection reads from a model: ``model_index.json``'s ``_class_name`` (None when unknown),
    the UNet config, and the component classes (``model_index.json`` ``name → [library, class]``)."""

    pipeline_class: str | None
    unet: Mapping[str, Any]
    components: Mapping[str, tuple[str, str]] = field(default_factory=dict)


class ModelFamily:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    label: ClassVar[str]
    # ``model_index.json`` ``_class_name`` values of this family; the first is the class that loads it.
    pipeline_classes: ClassVar[tuple[str, ...]]
    text_encoders: ClassVar[tuple[str, ...]]
    # the pipeline attribute holding each text encoder's tokenizer (same order as ``text_encoders``)
    tokenizers: ClassVar[tuple[str, ...]]
    default_resolution: ClassVar[int]
    # cross-attention width of the released models (tiny test models use their own widths)
    context_width: ClassVar[int]
    # kohya/A1111 LoRA key prefix → component (what sd-scripts writes for this family)
    kohya_prefixes: ClassVar[dict[str, str]]
    # how sd-scripts names this family's UNet modules: "diffusers" (``lora_unet_down_blocks_0_…``) or
    # "ldm" (the SGM/LDM layout, ``lora_unet_input_blocks_4_1_…``, mapped by ``adapters.kohya_ldm``)
    kohya_unet_layout: ClassVar[str] = "diffusers"
    # key prefixes that together identify this family's single-file (LDM/SGM) checkpoints, and in words
    checkpoint_markers: ClassVar[tuple[str, ...]]
    checkpoint_description: ClassVar[str]
    modelspec: ClassVar[str]
    kohya_version: ClassVar[str]
    # whether ``loraswap train`` supports it yet
    trainable: ClassVar[bool] = False
    # the tensors ``training_text`` returns (what the trainer's embedding cache holds per caption)
    training_text_keys: ClassVar[tuple[str, ...]] = ("hidden",)

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"

    # -- detection ---------------------------------------------------------------------------------
    def claims(self, signals: ModelSignals) -> bool:
        """Whether a model with these signals belongs to this family (asked in registry order)."""
        raise NotImplementedError

    def problems(self, signals: ModelSignals) -> list[str]:
        """What in a model claimed by its pipeline class contradicts this family (empty: consistent)."""
        missing = [name for name in ("unet", *self.text_encoders) if name not in signals.components]
        return [f"it has no {' or '.join(missing)}"] if signals.components and missing else []

    # -- loading -----------------------------------------------------------------------------------
    def pipeline_class(self) -> type[Any]:
        import diffusers

        cls: type[Any] = getattr(diffusers, self.pipeline_classes[0])
        return cls

    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` / constructor arguments (components to leave out)."""
        return {}

    def after_load(self, pipe: Any) -> None:
        """Adjust a loaded pipeline once it is on its device and dtype (default: nothing)."""

    def lora_components(self, pipe: Any) -> dict[str, nn.Module]:
        """Component name → module, for every component whose modules LoRA may target."""
        return {name: getattr(pipe, name) for name in ("unet", *self.text_encoders)}

    def architecture(self, pipe: Any) -> Architecture:
        return architecture_of(self.lora_components(pipe), family=self.name)

    def meta_architecture(self, folder: Any, index: Mapping[str, Any]) -> Architecture:
        """The architecture of a diffusers folder from its configs alone (modules on ``meta``)."""
        components: dict[str, nn.Module] = {}
        with torch.device("meta"):
            for name in ("unet", *self.text_encoders):
                library, class_name = index[name]
                cls = getattr(importlib.import_module(library), class_name)
                if library == "diffusers":
                    components[name] = cls.from_config(cls.load_config(folder / name))
                else:
                    components[name] = cls(cls.config_class.from_pretrained(folder / name))
        return architecture_of(components, family=self.name)

    def native_size(self, pipe: Any) -> int:
        """Default width and height: the UNet's sample size in pixels (diffusers' default), else the
        family's resolution."""
        sample_size = getattr(pipe.unet.config, "sample_size", None)
        if sample_size is None:
            return self.default_resolution
        return int(sample_size) * int(pipe.vae_scale_factor)

    @staticmethod
    def prediction_type(scheduler_config: Mapping[str, Any]) -> str:
        """What the UNet predicts, from the scheduler config (SD2 768-v: ``v_prediction``)."""
        return str(scheduler_config.get("prediction_type") or "epsilon")

    # -- names other tools use -----------------------------------------------------------------------
    def modelspec_architecture(self, prediction_type: str | None = None) -> str:
        """SAI modelspec ``modelspec.architecture`` for a LoRA on this family."""
        return f"{self.modelspec}/lora"

    def kohya_base_version(self, prediction_type: str | None = None) -> str:
        """kohya sd-scripts' ``ss_base_model_version``."""
        return self.kohya_version

    def kohya_prefix(self, component: str) -> str:
        """The kohya key prefix of ``component`` (``lora_unet_``, ``lora_te_`` / ``lora_te1_`` …)."""
        for prefix, owner in self.kohya_prefixes.items():
            if owner == component:
                return prefix
        raise KeyError(f"{self.name} has no kohya prefix for component {component!r}")

    # -- sampling ------------------------------------------------------------------------------------
    def encode(
        self,
        pipe: Any,
        prompt: str,
        negative_prompt: str,
        *,
        num_images: int,
        guidance: bool,
        width: int,
        height: int,
        embeddings: Mapping[str, Embedding] | None = None,
    ) -> Conditioning:
        """The prompt (and negative prompt, under guidance) as UNet inputs, ``num_images`` rows each;
        an empty ``negative_prompt`` means none, as diffusers' ``negative_prompt=None``. Names of
        ``embeddings`` (textual inversion, name → vectors) in either stand for their vectors, for this
        encoding only (``basemodel.textual_inversion``)."""
        raise NotImplementedError

    def inpainting(self, pipe: Any) -> bool:
        """Whether the UNet is a dedicated inpainting one: it takes the latents, the mask and the masked
        image's latents stacked (9 input channels on SD1.5/SDXL inpainting checkpoints)."""
        return int(pipe.unet.config.in_channels) == 2 * int(pipe.vae.config.latent_channels) + 1

    def encode_image(
        self, pipe: Any, pixels: torch.Tensor, generators: Sequence[torch.Generator], *, normalise: bool
    ) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents, row i sampled from the VAE's posterior with
        ``generators[i]`` (``StableDiffusionImg2ImgPipeline.prepare_latents`` /
        ``StableDiffusionInpaintPipeline._encode_vae_image``). ``normalise``: also apply the VAE's
        ``latents_mean``/``latents_std`` where the family's img2img pipeline does (SDXL)."""
        vae = pipe.vae
        rows = [vae.encode(pixels[i : i + 1]).latent_dist.sample(g) for i, g in enumerate(generators)]
        return float(vae.config.scaling_factor) * torch.cat(rows)

    def begin_denoising(self, scheduler: Any) -> None:
        """Prepare a fresh scheduler after ``set_timesteps``, as the family's pipeline does."""

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Final latents → images in [-1, 1] (``vae.decode``), as the family's pipeline does."""
        decoded: torch.Tensor = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[
            0
        ]
        return decoded

    # -- training ------------------------------------------------------------------------------------
    def text_width(self, pipe: Any) -> int:
        """Width of the text conditioning the UNet cross-attends to (SDXL: both encoders concatenated)."""
        return sum(int(getattr(pipe, name).config.hidden_size) for name in self.text_encoders)

    def tokenize(self, pipe: Any, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids of ``captions`` for every text encoder (component name → ``[rows, max_length]``),
        padded and truncated to each tokenizer's max length, as the family's pipeline tokenizes."""
        out: dict[str, torch.Tensor] = {}
        for encoder, attribute in zip(self.text_encoders, self.tokenizers, strict=True):
            tokenizer = getattr(pipe, attribute)
            out[encoder] = tokenizer(
                list(captions),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return out

    def training_text(self, pipe: Any, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the text encoders give the UNet in training, keyed by ``training_text_keys`` (gradients
        flow when a text-encoder LoRA trains; the trainer caches the result while they are frozen)."""
        raise NotImplementedError

    def size_conditioning(
        self, original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Per-image conditioning from the image's original (height, width), the (top, left) corner of
        the crop taken from it after resizing and the (height, width) trained at; none by default."""
        return {}

    def training_inputs(
        self, text: Mapping[str, torch.Tensor], added: Mapping[str, torch.Tensor]
    ) -> UNetInputs:
        """UNet inputs of a training batch from ``training_text`` and ``size_conditioning`` rows:
        ``hidden`` is the cross-attention context, everything else goes to ``added_cond_kwargs``."""
        extra = {key: value for key, value in text.items() if key != "hidden"}
        return UNetInputs(text["hidden"], {**extra, **added})

    def training_vae_dtype(self, pipe: Any, dtype: torch.dtype) -> torch.dtype:
        """The dtype the trainer keeps the (frozen) VAE in when the base trains in ``dtype``."""
        return dtype
