"""Encode the dataset once: VAE latent distributions and (frozen) text-encoder embeddings.

The VAE never trains, so each image is encoded once per target size and flip; its latent
distribution (mean and std, already multiplied by the VAE scaling factor) is kept and a fresh latent
is sampled from it at every step, which is what encoding per step would give, without the VAE cost.
Text embeddings (whatever the family's ``training_text`` gives: SDXL's both-encoder hidden states and
pooled projection) are cached only while the text encoders are frozen; the part no LoRA ever trains
(T5's states on SD3/Flux, ``frozen_text``) is cached in any case. Each image's size conditioning
(SDXL time ids) is computed from where its crop lies, for the plain and the flipped sample.
``cache = "disk"`` also writes each entry as a safetensors file keyed by the base-model fingerprint,
the image sha256 and the size, so another run (or a resumed one) on the same data skips encoding.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.conditioning import Conditioner, Tensors
from training.data.buckets import Size, crop_geometry, resize_crop, to_tensor
from training.data.dataset import Example, load_image

ENCODE_BATCH = 8


@dataclass
class EncodedItem:
    """One example ready for training: latent distribution(s), token ids per text encoder, maybe the
    cached text conditioning, and the size conditioning of the plain (and flipped) sample."""

    caption: str
    size: Size
    mean: torch.Tensor
    std: torch.Tensor
    tokens: Tensors
    mean_flip: torch.Tensor | None = None
    std_flip: torch.Tensor | None = None
    text: Tensors | None = None
    added: Tensors = field(default_factory=dict)
    frozen: Tensors | None = None  # the never-trained text part (T5), cached while a CLIP LoRA trains
    added_flip: Tensors | None = None

    def added_for(self, flip: bool) -> Tensors:
        return self.added_flip if flip and self.added_flip is not None else self.added

    def sample_latent(self, generator: torch.Generator, flip: bool) -> torch.Tensor:
        mean, std = (
            (self.mean_flip, self.std_flip) if flip and self.mean_flip is not None else (self.mean, self.std)
        )
        assert std is not None and mean is not None
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + std * noise


class EncodeCache:
    """Optional on-disk store of encoded entries (one safetensors file per entry, atomic writes)."""

    def __init__(self, folder: Path | None, model_key: str) -> None:
        self.folder = folder
        self.model_key = model_key
        self.hits = 0
        self.misses = 0

    def key(self, *parts: object) -> str:
        return hashlib.sha256("|".join([self.model_key, *map(str, parts)]).encode()).hexdigest()

    def get(self, kind: str, key: str, required: Sequence[str] = ()) -> dict[str, torch.Tensor] | None:
        """The entry, or None (a miss) when it is absent, unreadable or lacks a ``required`` tensor."""
        if self.folder is None:
            return None
        path = self.folder / kind / f"{key}.safetensors"
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a truncated/corrupt cache file is just a miss
            self.misses += 1
            return None
        if not set(required) <= set(tensors):  # written by an older layout
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        folder = self.folder / kind
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, folder / f"{key}.safetensors")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@torch.no_grad()
def _encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config: Any = vae.config
    dist = vae.encode(pixels).latent_dist  # type: ignore[operator]
    scale = float(config.scaling_factor)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return ((dist.mean - shift) * scale).float().cpu(), (dist.std * scale).float().cpu()


def encode_latents(
    examples: Sequence[Example],
    sizes: Sequence[Size],
    vae: torch.nn.Module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    flip: bool,
    store: EncodeCache,
    progress: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Latent mean/std (and their flipped versions when ``flip``) of every example at its size."""
    results: list[dict[str, torch.Tensor] | None] = [None] * len(examples)
    todo: list[int] = []
    for i, (example, size) in enumerate(zip(examples, sizes, strict=True)):
        cached = store.get("latents", store.key(example.sha256, size, flip))
        if cached is not None:
            results[i] = cached
        else:
            todo.append(i)
    by_size: dict[Size, list[int]] = {}
    for i in todo:
        by_size.setdefault(sizes[i], []).append(i)
    bar = tqdm(total=len(todo), desc="encoding images", unit="img", disable=not progress or not todo)
    for size, indices in by_size.items():
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = indices[start : start + ENCODE_BATCH]
            pixels = torch.stack([to_tensor(resize_crop(load_image(examples[i].path), size)) for i in chunk])
            pixels = pixels.to(device=device, dtype=dtype)
            mean, std = _encode_pixels(vae, pixels)
            if flip:
                mean_f, std_f = _encode_pixels(vae, torch.flip(pixels, dims=[3]))
            for j, i in enumerate(chunk):
                entry = {"mean": mean[j], "std": std[j]}
                if flip:
                    entry |= {"mean_flip": mean_f[j], "std_flip": std_f[j]}
                store.put("latents", store.key(examples[i].sha256, size, flip), entry)
                results[i] = entry
            bar.update(len(chunk))
    bar.close()
    return [r for r in results if r is not None]


@torch.no_grad()
def encode_text(
    captions: Sequence[str],
    conditioner: Conditioner,
    *,
    device: torch.device,
    store: EncodeCache,
    frozen_only: bool = False,
) -> dict[str, Tensors]:
    """Caption → text conditioning of the (frozen) text encoders, each unique caption once;
    ``frozen_only``: only the never-trained part (T5), while a text-encoder LoRA trains."""
    out: dict[str, Tensors] = {}
    todo = []
    keys = conditioner.frozen_keys if frozen_only else conditioner.text_keys
    kind = "frozen" if frozen_only else "text"
    encode = conditioner.encode_frozen if frozen_only else conditioner.encode_text
    for caption in dict.fromkeys(captions):
        cached = store.get(kind, store.key(kind, caption), required=keys)
        if cached is not None:
            out[caption] = {key: cached[key] for key in keys}
        else:
            todo.append(caption)
    for start in range(0, len(todo), ENCODE_BATCH * 4):
        chunk = todo[start : start + ENCODE_BATCH * 4]
        tokens = {name: ids.to(device) for name, ids in conditioner.tokenize(chunk).items()}
        encoded = {key: value.float().cpu() for key, value in encode(tokens).items()}
        for row, caption in enumerate(chunk):
            entry = {key: encoded[key][row] for key in keys}
            store.put(kind, store.key(kind, caption), entry)
            out[caption] = entry
    return out


def encode_dataset(
    examples: Sequence[Example],
    sizes: Sequence[Size],
    conditioner: Conditioner,
    *,
    device: torch.device,
    dtype: torch.dtype,
    flip: bool,
    cache_text: bool,
    store: EncodeCache,
    progress: bool = False,
) -> list[EncodedItem]:
    """Everything the loop needs per example, with nothing left to encode per step but the text
    when the text encoder trains."""
    if not examples:
        return []
    latents = encode_latents(
        examples,
        sizes,
        conditioner.pipe.vae,
        device=device,
        dtype=dtype,
        flip=flip,
        store=store,
        progress=progress,
    )
    captions = [e.caption for e in examples]
    tokens = conditioner.tokenize(captions)
    texts = encode_text(captions, conditioner, device=device, store=store) if cache_text else {}
    frozen: dict[str, Tensors] = {}
    if not cache_text and conditioner.frozen_keys:
        frozen = encode_text(captions, conditioner, device=device, store=store, frozen_only=True)
    items = []
    for i, (example, size, entry) in enumerate(zip(examples, sizes, latents, strict=True)):
        crop = crop_geometry(example.width, example.height, size)
        items.append(
            EncodedItem(
                caption=example.caption,
                size=size,
                mean=entry["mean"],
                std=entry["std"],
                tokens={name: ids[i] for name, ids in tokens.items()},
                mean_flip=entry.get("mean_flip"),
                std_flip=entry.get("std_flip"),
                text=texts.get(example.caption),
                frozen=frozen.get(example.caption),
                added=conditioner.size_conditioning(crop),
                added_flip=conditioner.size_conditioning(crop, flipped=True) if flip else None,
            )
        )
    return items
