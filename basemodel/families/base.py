"""``ModelFamily``: everything that differs between model families, behind one interface.

A family names its **denoiser** component (``unet`` for SD1.x/SD2.x/SDXL, ``transformer`` for SD3 and
Flux.1) and owns everything that differs around it:

* detection, loading and the components LoRA may target (the denoiser and the text encoders a LoRA may
  touch; a frozen encoder such as T5 is listed in ``frozen_text_encoders``);
* prompt encoding (``encode``: what the denoiser takes besides latents and timestep, as
  ``DenoiserInputs``) and how guidance applies (``cfg_scale``: the classifier-free scale the loop
  applies; Flux-dev puts its distilled guidance into the inputs instead);
* the latent space (``noise_latents``: initial noise in the denoiser's layout — Flux packs 2×2 patches;
  ``decode``: back to pixels with the VAE's ``scaling_factor`` and ``shift_factor``);
* the scheduler's set-up (``set_timesteps``: SD3's static shift, Flux's dynamic ``mu``) and which
  samplers it takes (``flow_matching``);
* the model call (``denoiser_call``: a callable ``(latents, t) → prediction`` with the family's
  keyword arguments, timestep scaling and positional ids bound once per batch);
* how the trainer conditions and calls it (``tokenize``, ``training_text`` and ``frozen_text`` (T5's
  states, cached even while a CLIP LoRA trains), ``size_conditioning``, ``training_inputs``,
  ``training_prediction`` on VAE-layout latents (Flux packs inside), ``training_targets``,
  ``training_size_multiple``, ``training_problems``; flow-matching families train with
  ``training.flow``), and the names other tools use for it (kohya key prefixes, the SAI modelspec
  architecture, kohya's ``ss_base_model_version``, ``community_lora`` for other key layouts).

The values that cross this interface (``ModelSignals``, ``DenoiserInputs``, ``Conditioning``,
``DenoiserCall``) live in ``basemodel.families.values``.

The sampling loop (``service/engine/sampler.py``) asks the family for each of these and keeps no
family branch. Code outside ``basemodel/families/`` asks the family object instead of testing its name.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from basemodel.families.lora_tables import CommunityLayout
from basemodel.families.values import Conditioning, DenoiserCall, DenoiserInputs, ModelSignals
from basemodel.fingerprint import Architecture, architecture_of

if TYPE_CHECKING:
    from basemodel.textual_inversion import Embedding


class ModelFamily:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    label: ClassVar[str]
    # the pipeline attribute holding the denoiser: "unet" or "transformer"
    denoiser: ClassVar[str] = "unet"
    # flow matching (SD3, Flux: FlowMatch schedulers) rather than noise/v prediction on a DDPM schedule
    flow_matching: ClassVar[bool] = False
    # the sampler and guidance scale a request gets when it names none
    default_scheduler: ClassVar[str] = "ddim"
    default_guidance: ClassVar[float] = 7.5
    # request modes besides text-to-image that the family supports
    image_modes: ClassVar[frozenset[str]] = frozenset({"img2img", "inpaint"})
    # ``model_index.json`` ``_class_name`` values of this family; the first is the class that loads it.
    pipeline_classes: ClassVar[tuple[str, ...]]
    # the text encoders LoRA may target, in pipeline order
    text_encoders: ClassVar[tuple[str, ...]]
    # text encoders the family runs but no LoRA may target (T5 on SD3/Flux), with a word for each
    frozen_text_encoders: ClassVar[dict[str, str]] = {}
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
    # or: exact keys any one of which identifies them (diffusers' ``CHECKPOINT_KEY_NAMES`` for SD3, Flux)
    checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    modelspec: ClassVar[str]
    kohya_version: ClassVar[str]
    # whether textual-inversion embeddings (``basemodel.textual_inversion``) can be used in its prompts
    embeddings: ClassVar[bool] = True
    # textual inversion: the text encoder that takes each part of an embedding file (``single``: a
    # one-encoder file, A1111's ``emb_params`` or diffusers' ``learned_embeds``; ``clip_l`` / ``clip_g``:
    # A1111's SDXL parts); every encoder named here must get vectors (``adapters.embedding``)
    embedding_parts: ClassVar[Mapping[str, str]] = {"single": "text_encoder", "clip_l": "text_encoder"}
    # parts of a file it drops: vectors for an encoder it lacks that still fit a file's other parts
    # (Flux: SDXL files' ``clip_g``); T5 vectors (ComfyUI's ``t5xxl``) are dropped on every family
    embedding_dropped: ClassVar[frozenset[str]] = frozenset()
    # whether ``loraswap train`` supports it yet
    trainable: ClassVar[bool] = False
    # the tensors ``training_text`` returns (what the trainer's embedding cache holds per caption)
    training_text_keys: ClassVar[tuple[str, ...]] = ("hidden",)
    # the tensors ``frozen_text`` returns (cached even while a text-encoder LoRA trains)
    frozen_text_keys: ClassVar[tuple[str, ...]] = ()
    # the denoiser modules ``loraswap train`` adapts by default (peft ``target_modules`` suffixes)
    training_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # flow-matching families: the timestep density / loss weighting their diffusers script defaults to
    training_weighting: ClassVar[str] = "none"

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"

    # -- detection ---------------------------------------------------------------------------------
    def claims(self, signals: ModelSignals) -> bool:
        """Whether a model with these signals belongs to this family (asked in registry order)."""
        raise NotImplementedError

    def problems(self, signals: ModelSignals) -> list[str]:
        """What in a model claimed by its pipeline class contradicts this family (empty: consistent)."""
        missing = [name for name in (self.denoiser, *self.text_encoders) if name not in signals.components]
        return [f"it has no {' or '.join(missing)}"] if signals.components and missing else []

    def claims_checkpoint(self, keys: Collection[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is this family's: one of
        ``checkpoint_keys``, or every ``checkpoint_markers`` prefix."""
        if any(key in keys for key in self.checkpoint_keys):
            return True
        markers = self.checkpoint_markers
        return bool(markers) and all(any(key.startswith(marker) for key in keys) for marker in markers)

    # -- loading -----------------------------------------------------------------------------------
    def pipeline_class(self) -> type[Any]:
        import diffusers

        cls: type[Any] = getattr(diffusers, self.pipeline_classes[0])
        return cls

    def load_kwargs(self, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Extra ``from_pretrained`` / constructor arguments (components to leave out); ``index``: the
        folder's ``model_index.json`` when loading one."""
        return {}

    def after_load(self, pipe: Any) -> None:
        """Adjust a loaded pipeline once it is on its device and dtype (default: nothing)."""

    def denoiser_module(self, pipe: Any) -> Any:
        """The pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``; a diffusers model, typed
        loosely as the pipeline is: it has ``device``, ``dtype`` and ``config``)."""
        return getattr(pipe, self.denoiser)

    def lora_components(self, pipe: Any) -> dict[str, nn.Module]:
        """Component name → module, for every component whose modules LoRA may target; the denoiser
        first (``LoRAModelManager`` fuses the first component)."""
        return {name: getattr(pipe, name) for name in (self.denoiser, *self.text_encoders)}

    def community_lora(self, tensors: Mapping[str, torch.Tensor], architecture: Architecture) -> Any:
        """A LoRA file in a layout only this family's tools write, converted; None when ``tensors`` are
        in no such layout (the generic readers then take them: PEFT/diffusers, kohya, LyCORIS).

        Contract for implementers: called before the generic readers with the file's tensors and the
        base's ``Architecture`` (its ``family`` is this one). Return None to decline; otherwise return
        ``(canonical, info)`` exactly as ``adapters.normalise.normalise`` returns them — canonical keys
        ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` with alpha/rank folded into
        ``lora_B``, every module in ``architecture.modules`` — or raise a typed ``AdapterInvalid`` /
        ``AdapterIncompatible`` naming what was found. Fused projections (Flux's qkv) are split at the
        model's own widths, never guessed. Default: no community layout — families whose community
        layouts are key tables say so with ``lora_layout`` instead, which ``adapters.community`` applies.
        """
        return None

    def lora_layout(self, config: Mapping[str, Any]) -> CommunityLayout | None:
        """The key tables of the LoRA layouts only this family's tools write (the original model's
        module names: kohya sd-scripts, ComfyUI, ai-toolkit, XLabs), built from the denoiser's
        ``config``; ``adapters.community`` reads and writes files with them. None: no such layout (the
        UNet families' kohya names are read by ``adapters.normalise``)."""
        return None

    def architecture(self, pipe: Any) -> Architecture:
        return architecture_of(self.lora_components(pipe), family=self.name)

    def meta_architecture(self, folder: Any, index: Mapping[str, Any]) -> Architecture:
        """The architecture of a diffusers folder from its configs alone (modules on ``meta``)."""
        components: dict[str, nn.Module] = {}
        with torch.device("meta"):
            for name in (self.denoiser, *self.text_encoders):
                library, class_name = index[name]
                cls = getattr(importlib.import_module(library), class_name)
                if library == "diffusers":
                    components[name] = cls.from_config(cls.load_config(folder / name))
                else:
                    components[name] = cls(cls.config_class.from_pretrained(folder / name))
        return architecture_of(components, family=self.name)

    def native_size(self, pipe: Any) -> int:
        """Default width and height: the denoiser's sample size in pixels (diffusers' default), else the
        family's resolution."""
        sample_size = getattr(self.denoiser_module(pipe).config, "sample_size", None)
        if sample_size is None:
            return self.default_resolution
        return int(sample_size) * int(pipe.vae_scale_factor)

    @staticmethod
    def prediction_type(scheduler_config: Mapping[str, Any]) -> str:
        """What the UNet predicts, from the scheduler config (SD2 768-v: ``v_prediction``)."""
        return str(scheduler_config.get("prediction_type") or "epsilon")

    # -- names other tools use -----------------------------------------------------------------------
    def modelspec_architecture(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        """SAI modelspec ``modelspec.architecture`` for a LoRA on this family (``config``: the
        denoiser's, for families whose name depends on the variant)."""
        return f"{self.modelspec}/lora"

    def kohya_base_version(
        self, prediction_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str:
        """kohya sd-scripts' ``ss_base_model_version``."""
        return self.kohya_version

    def interop_aliases(self, key: str) -> frozenset[str]:
        """Every other value of header ``key`` (``modelspec.architecture``, ``ss_base_model_version``)
        that names this family (its variants: Flux dev and schnell …); none by default."""
        return frozenset()

    def kohya_prefix(self, component: str) -> str:
        """The kohya key prefix of ``component`` (``lora_unet_``, ``lora_te_`` / ``lora_te1_`` …)."""
        for prefix, owner in self.kohya_prefixes.items():
            if owner == component:
                return prefix
        raise KeyError(f"{self.name} has no kohya prefix for component {component!r}")

    # -- sampling ------------------------------------------------------------------------------------
    def cfg_scale(self, guidance_scale: float, true_cfg_scale: float, negative_prompt: str) -> float:
        """The classifier-free guidance scale the loop applies (≤ 1: none, no unconditional rows).
        Default: ``guidance_scale`` (SD1.x … SDXL, SD3)."""
        return guidance_scale

    def split_guidance(self, cfg_scale: float, distilled_scale: float) -> tuple[float, float]:
        """``(guidance_scale, true_cfg_scale)`` for a classifier-free scale and a distilled-guidance value
        given apart (Forge's ``cfg_scale`` and ``distilled_cfg_scale``). Default: CFG is
        ``guidance_scale``; there is no distilled guidance to set."""
        return cfg_scale, 1.0

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
        guidance_scale: float = 0.0,
        device: torch.device | None = None,
        embeddings: Mapping[str, Embedding] | None = None,
    ) -> Conditioning:
        """The prompt (and negative prompt, under guidance) as denoiser inputs, ``num_images`` rows each;
        an empty ``negative_prompt`` means none, as diffusers' ``negative_prompt=None``. ``guidance``:
        classifier-free guidance is on; ``guidance_scale``: the request's, for families that embed it
        (Flux-dev); ``device``: where the text encoders run (default: the denoiser's device). Names of
        ``embeddings`` (textual inversion, name → vectors) in either stand for their vectors, for this
        encoding only (``basemodel.textual_inversion``)."""
        raise NotImplementedError

    def size_multiple(self, pipe: Any) -> int:
        """Width and height must be multiples of this (beyond the API's 8): the VAE factor times the
        transformer's patch size on SD3 and Flux (16 on the released models); 1: no further rule."""
        return 1

    def latent_channels(self, pipe: Any) -> int:
        """Channels of the initial noise (the denoiser's input channels)."""
        return int(self.denoiser_module(pipe).config.in_channels)

    def latent_shape(self, pipe: Any, rows: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of ``rows`` latents for a ``height`` × ``width`` image in the denoiser's layout."""
        factor = int(pipe.vae_scale_factor)
        return (rows, self.latent_channels(pipe), height // factor, width // factor)

    def noise_latents(
        self,
        pipe: Any,
        rows: int,
        height: int,
        width: int,
        generators: Sequence[torch.Generator],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Initial noise in the denoiser's layout, row i from ``generators[i]`` (the pipelines'
        ``prepare_latents``), before ``init_noise_sigma``."""
        from diffusers.utils.torch_utils import randn_tensor  # diffusers only when sampling

        shape = self.latent_shape(pipe, rows, height, width)
        return randn_tensor(shape, generator=list(generators), device=device, dtype=dtype)

    def set_timesteps(
        self,
        pipe: Any,
        scheduler: Any,
        steps: int,
        device: torch.device,
        *,
        latent_shape: tuple[int, ...],
    ) -> None:
        """Set a fresh scheduler's timesteps for ``steps`` as the family's pipeline does;
        ``latent_shape``: ``latent_shape`` of the batch (flow families derive the shift from it)."""
        scheduler.set_timesteps(steps, device=device)
        self.begin_denoising(scheduler)

    def denoiser_call(self, pipe: Any, inputs: DenoiserInputs, *, height: int, width: int) -> DenoiserCall:
        """The model call the loop makes each step, with ``inputs`` (all rows of the batch, guidance
        copies included) bound: UNet families call ``unet(x, t, encoder_hidden_states=…,
        added_cond_kwargs=…)``."""
        unet = self.denoiser_module(pipe)
        kwargs = inputs.unet_kwargs()

        def call(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = unet(model_input, t, **kwargs, return_dict=False)[0]
            return out

        return call

    def inpainting(self, pipe: Any) -> bool:
        """Whether the denoiser is a dedicated inpainting one: it takes the latents, the mask and the
        masked image's latents stacked (9 input channels on SD1.5/SDXL inpainting checkpoints)."""
        channels = int(self.denoiser_module(pipe).config.in_channels)
        return channels == 2 * int(pipe.vae.config.latent_channels) + 1

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

    def start_step(self, steps: int, strength: float) -> int:
        """Image-to-image: the index of the first step run (``get_timesteps`` of the family's Img2Img
        pipeline; SD1.x … SDXL: ``steps − min(int(steps × strength), steps)``)."""
        return max(steps - min(int(steps * strength), steps), 0)

    def noise_image(
        self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """Image latents noised to ``timestep`` (``scheduler.add_noise``), in the denoiser's layout."""
        noised: torch.Tensor = scheduler.add_noise(latents, noise, timestep)
        return noised

    def begin_denoising(self, scheduler: Any) -> None:
        """Prepare a fresh scheduler after ``set_timesteps``, as the family's pipeline does."""

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[rows, channels, h, w]`` → the denoiser's layout (default: as they are)."""
        return latents

    def unpack(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None, width: int | None
    ) -> torch.Tensor:
        """Latents in the denoiser's layout → the VAE's ``[rows, channels, h, w]`` (default: as they are)."""
        return latents

    def decode(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Final latents → images in [-1, 1] (``vae.decode``), as the family's pipeline does;
        ``height``/``width``: the image size (families with packed latents need it)."""
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

    def training_text(
        self,
        pipe: Any,
        tokens: Mapping[str, torch.Tensor],
        frozen: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """What the text encoders give the UNet in training, keyed by ``training_text_keys`` (gradients
        flow when a text-encoder LoRA trains; the trainer caches the result while they are frozen).
        ``frozen``: ``frozen_text`` of the same captions, cached, used instead of running those encoders."""
        raise NotImplementedError

    def frozen_text(self, pipe: Any, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of ``training_text`` that never trains (T5's states on SD3/Flux), keyed by
        ``frozen_text_keys``: cached even while a text-encoder LoRA trains. Default: none."""
        return {}

    def size_conditioning(
        self, original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Per-image conditioning from the image's original (height, width), the (top, left) corner of
        the crop taken from it after resizing and the (height, width) trained at; none by default."""
        return {}

    def training_inputs(
        self, text: Mapping[str, torch.Tensor], added: Mapping[str, torch.Tensor]
    ) -> DenoiserInputs:
        """UNet inputs of a training batch from ``training_text`` and ``size_conditioning`` rows:
        ``hidden`` is the cross-attention context, everything else goes to ``added_cond_kwargs``."""
        extra = {key: value for key, value in text.items() if key != "hidden"}
        return DenoiserInputs(text["hidden"], {**extra, **added})

    def training_prediction(
        self,
        pipe: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        inputs: DenoiserInputs,
        *,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """The denoiser's output for noisy VAE latents ``[rows, channels, h, w]`` at ``timesteps``
        (the scheduler's: DDPM indices, or σ·1000 on flow-matching families), in the same layout.
        ``guidance``: the value a guidance-distilled denoiser (Flux-dev) is trained at (unused here)."""
        out: torch.Tensor = self.denoiser_module(pipe)(
            noisy, timesteps, **inputs.unet_kwargs(), return_dict=False
        )[0]
        return out

    def embeds_guidance(self, pipe: Any) -> bool:
        """Whether the denoiser takes the guidance scale as an input (guidance-distilled: Flux-dev)."""
        return False

    def training_size_multiple(self, pipe: Any) -> int:
        """Training image sides must be multiples of this: the VAE factor × the UNet's down-sampling."""
        config: Any = self.denoiser_module(pipe).config
        blocks = len(config.block_out_channels)
        return int(pipe.vae_scale_factor) * 2 ** (blocks - 1)

    def training_problems(self, pipe: Any) -> list[str]:
        """What makes a loaded pipeline untrainable (empty: fine): the UNet must cross-attend to the
        width its text encoders give."""
        config: Any = self.denoiser_module(pipe).config
        cross = int(config.cross_attention_dim)
        hidden = self.text_width(pipe)
        if cross == hidden:
            return []
        encoders = " + ".join(self.text_encoders)
        return [
            f"UNet cross-attention width {cross} does not match the text encoder(s) ({encoders}: {hidden})"
        ]

    def training_vae_dtype(self, pipe: Any, dtype: torch.dtype) -> torch.dtype:
        """The dtype the trainer keeps the (frozen) VAE in when the base trains in ``dtype``."""
        return dtype
