"""What the flow-matching transformer families (SD3/SD3.5, Flux.1) share.

They denoise with an MMDiT ``transformer`` that predicts a velocity on a FlowMatch schedule (sigmas
from 1 towards 0, timesteps σ·1000), and their VAE latents are ``(z − shift_factor) · scaling_factor``,
so decoding is ``vae.decode(latents / scaling_factor + shift_factor)``. The shift of the schedule is the
family's: SD3's is static (``shift`` in its scheduler config, 3.0), Flux's follows the image's sequence
length (``calculate_shift``'s ``mu``), as their pipelines compute it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from basemodel.families.base import ModelFamily
from basemodel.families.values import DenoiserInputs
from basemodel.textual_inversion import encode_text

if TYPE_CHECKING:
    from basemodel.textual_inversion import Embedding


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' ``calculate_shift`` (Flux, SD3 with dynamic shifting): ``mu`` linear in the sequence
    length between (``base_seq_len``, ``base_shift``) and (``max_seq_len``, ``max_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def dynamic_mu(config: Any, image_seq_len: int, max_shift: float) -> float:
    """``mu`` from a scheduler config's ``base/max_image_seq_len`` and ``base/max_shift``."""
    return calculate_shift(
        image_seq_len,
        int(config.get("base_image_seq_len", 256)),
        int(config.get("max_image_seq_len", 4096)),
        float(config.get("base_shift", 0.5)),
        float(config.get("max_shift", max_shift)),
    )


def set_flow_timesteps(scheduler: Any, steps: int, device: torch.device, **wanted: Any) -> None:
    """``retrieve_timesteps`` for any scheduler: ``wanted`` (``sigmas``, ``mu``) are passed where its
    ``set_timesteps`` takes them, and left out where it does not (FlowMatchHeun: its static shift)."""
    accepted = set(inspect.signature(scheduler.set_timesteps).parameters)
    kwargs = {key: value for key, value in wanted.items() if key in accepted and value is not None}
    if "sigmas" in kwargs:
        scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


class FlowMatchFamily(ModelFamily):
    """A transformer family trained with flow matching (SD3, Flux): text-to-image and image-to-image
    (their Img2Img pipelines); inpainting not yet."""

    denoiser: ClassVar[str] = "transformer"
    flow_matching: ClassVar[bool] = True
    default_scheduler: ClassVar[str] = "euler"
    image_modes: ClassVar[frozenset[str]] = frozenset({"img2img"})

    # T5 takes no textual inversion: a prompt's embedding names reach it as plain words, as in diffusers
    def embedded_text(
        self, pipe: Any, text: str, embeddings: Mapping[str, Embedding] | None, rows: int
    ) -> dict[str, torch.Tensor] | None:
        """``training_text`` of ``text`` with the embeddings it names in place on the CLIP encoders
        (``basemodel.textual_inversion``), repeated to ``rows``; None when it names none."""
        found = encode_text(self, pipe, text, embeddings or {})
        if found is None:
            return None
        return {key: value.repeat(rows, *[1] * (value.dim() - 1)) for key, value in found.items()}

    @staticmethod
    def prediction_type(scheduler_config: Any) -> str:
        """The velocity of the flow (ε − x₀), whatever the scheduler config says."""
        return "flow_prediction"

    def start_step(self, steps: int, strength: float) -> int:
        """``get_timesteps`` of ``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``: the
        strength is not truncated first (``int(steps − steps × strength)``)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def encode_image(
        self, pipe: Any, pixels: torch.Tensor, generators: Sequence[torch.Generator], *, normalise: bool
    ) -> torch.Tensor:
        """The image's latents ``(z − shift_factor) · scaling_factor``, sampled once with the first
        generator and repeated per output image: what the Img2Img pipelines do with one image and a list
        of generators (``_encode_vae_image`` / ``prepare_latents``)."""
        vae = pipe.vae
        sample = vae.encode(pixels[:1].to(vae.dtype)).latent_dist.sample(generators[0]).to(pixels.dtype)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        latents = (sample - shift) * float(vae.config.scaling_factor)
        return latents.repeat(len(generators), 1, 1, 1)

    def noise_image(
        self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """``scheduler.scale_noise``: (1 − σ)·x + σ·noise at the first step's σ, then ``pack``ed."""
        noised: torch.Tensor = scheduler.scale_noise(latents, timestep, noise)
        return self.pack(noised)

    def inpainting(self, pipe: Any) -> bool:
        return False

    def size_multiple(self, pipe: Any) -> int:
        """VAE factor × 2: SD3's 2×2 patches (its pipeline refuses other sizes) and Flux's 2×2 packing
        (its pipeline rounds down silently; refusing says so instead)."""
        return int(pipe.vae_scale_factor) * 2

    def begin_denoising(self, scheduler: Any) -> None:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def decode(
        self, pipe: Any, latents: torch.Tensor, *, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """``latents / scaling_factor + shift_factor`` through ``vae.decode`` (after ``unpack``)."""
        vae = pipe.vae
        latents = self.unpack(pipe, latents, height=height, width=width)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        latents = latents / float(vae.config.scaling_factor) + shift
        decoded: torch.Tensor = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return decoded

    # -- training (as diffusers' train_dreambooth_lora_sd3.py / _flux.py) ----------------------------
    def training_prediction(
        self,
        pipe: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        inputs: DenoiserInputs,
        *,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """``denoiser_call`` on the packed latents, unpacked again: the velocity ``ε − x₀`` the model
        predicts, in the VAE's layout. ``timesteps`` are σ·1000 (the family's call scales them)."""
        factor = int(pipe.vae_scale_factor)
        height, width = noisy.shape[-2] * factor, noisy.shape[-1] * factor
        call = self.denoiser_call(
            pipe, self.with_guidance(pipe, inputs, guidance), height=height, width=width
        )
        out = call(self.pack(noisy), timesteps)
        return self.unpack(pipe, out, height=height, width=width)

    def with_guidance(self, pipe: Any, inputs: DenoiserInputs, guidance: float) -> DenoiserInputs:
        """``inputs`` with the embedded guidance a distilled denoiser takes (default: none)."""
        return inputs

    def training_size_multiple(self, pipe: Any) -> int:
        """Training sizes follow the sampling rule (``size_multiple``: the 2×2 patches / packing)."""
        return self.size_multiple(pipe)

    def training_problems(self, pipe: Any) -> list[str]:
        """The transformer's ``joint_attention_dim`` must be the width of its text context."""
        config: Any = self.denoiser_module(pipe).config
        joint = int(config.joint_attention_dim)
        width = self.context_width_of(pipe)
        if width is None or width == joint:
            return []
        return [f"transformer joint_attention_dim {joint} does not match the text context width {width}"]

    def context_width_of(self, pipe: Any) -> int | None:
        """The width of the text context the encoders give (None: not known from the configs)."""
        return None

    def tokenize(self, pipe: Any, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids for the CLIPs (their max length) and for T5 (``max_sequence_length``), as the
        pipeline's ``encode_prompt`` tokenizes; T5's under its component name when it is loaded."""
        out = super().tokenize(pipe, captions)
        for encoder in self.frozen_text_encoders:
            if getattr(pipe, encoder, None) is None:
                continue
            tokenizer = getattr(pipe, self.t5_tokenizer)
            out[encoder] = tokenizer(
                list(captions),
                padding="max_length",
                max_length=self.sequence_length(pipe),
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
        return out

    def sequence_length(self, pipe: Any) -> int:
        """T5's ``max_sequence_length`` (the pipeline's default)."""
        raise NotImplementedError

    frozen_text_keys: ClassVar[tuple[str, ...]] = ("t5",)

    def frozen_text(self, pipe: Any, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """T5's last hidden states (zeros when the folder has none, as the pipelines give)."""
        (name,) = self.frozen_text_encoders
        t5 = getattr(pipe, name, None)
        if t5 is not None:
            return {"t5": t5(tokens[name], output_hidden_states=False)[0]}
        rows = next(iter(tokens.values())).shape[0]
        config: Any = self.denoiser_module(pipe).config
        width = int(config.joint_attention_dim)
        device = next(self.denoiser_module(pipe).parameters()).device
        return {"t5": torch.zeros(rows, self.sequence_length(pipe), width, device=device)}

    t5_tokenizer: ClassVar[str] = "tokenizer_2"
