"""Encode the dataset once: VAE latent distributions and (frozen) text-encoder embeddings.

The VAE never trains, so each image is encoded once per target size and flip; its latent
distribution (mean and std, already multiplied by the VAE scaling factor) is kept and a fresh latent
is sampled from it at every step, which is what encoding per step would give, without the VAE cost.
Text embeddings are cached only while the text encoder is frozen. ``cache = "disk"`` also writes
each entry as a safetensors file keyed by the base-model fingerprint, the image sha256 and the size,
so another run (or a resumed one) on the same data skips encoding entirely.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.data.buckets import Size, resize_crop, to_tensor
from training.data.dataset import Example, load_image

ENCODE_BATCH = 8


@dataclass
class EncodedItem:
    """One example ready for training: latent distribution(s), token ids and maybe an embedding."""

    caption: str
    size: Size
    mean: torch.Tensor
    std: torch.Tensor
    input_ids: torch.Tensor
    mean_flip: torch.Tensor | None = None
    std_flip: torch.Tensor | None = None
    embedding: torch.Tensor | None = None

    def sample_latent(self, generator: torch.Generator, flip: bool) -> torch.Tensor:
        mean, std = (
            (self.mean_flip, self.std_flip) if flip and self.mean_flip is not None else (self.mean, self.std)
        )
        assert std is not None and mean is not None
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + std * noise


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for SD1)."""
    out = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return out.input_ids


class EncodeCache:
    """Optional on-disk store of encoded entries (one safetensors file per entry, atomic writes)."""

    def __init__(self, folder: Path | None, model_key: str) -> None:
        self.folder = folder
        self.model_key = model_key
        self.hits = 0
        self.misses = 0

    def key(self, *parts: object) -> str:
        return hashlib.sha256("|".join([self.model_key, *map(str, parts)]).encode()).hexdigest()

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
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
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    *,
    device: torch.device,
    store: EncodeCache,
) -> dict[str, torch.Tensor]:
    """Caption → last hidden state of the (frozen) text encoder, each unique caption once."""
    out: dict[str, torch.Tensor] = {}
    todo = []
    for caption in dict.fromkeys(captions):
        cached = store.get("text", store.key("text", caption))
        if cached is not None:
            out[caption] = cached["embedding"]
        else:
            todo.append(caption)
    for start in range(0, len(todo), ENCODE_BATCH * 4):
        chunk = todo[start : start + ENCODE_BATCH * 4]
        ids = tokenize(tokenizer, chunk).to(device)
        hidden = text_encoder(ids, return_dict=False)[0].float().cpu()
        for caption, embedding in zip(chunk, hidden, strict=True):
            store.put("text", store.key("text", caption), {"embedding": embedding})
            out[caption] = embedding
    return out


def encode_dataset(
    examples: Sequence[Example],
    sizes: Sequence[Size],
    pipe: Any,
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
        pipe.vae,
        device=device,
        dtype=dtype,
        flip=flip,
        store=store,
        progress=progress,
    )
    captions = [e.caption for e in examples]
    ids = tokenize(pipe.tokenizer, captions)
    embeddings = (
        encode_text(captions, pipe.text_encoder, pipe.tokenizer, device=device, store=store)
        if cache_text
        else {}
    )
    return [
        EncodedItem(
            caption=example.caption,
            size=size,
            mean=entry["mean"],
            std=entry["std"],
            input_ids=ids[i],
            mean_flip=entry.get("mean_flip"),
            std_flip=entry.get("std_flip"),
            embedding=embeddings.get(example.caption),
        )
        for i, (example, size, entry) in enumerate(zip(examples, sizes, latents, strict=True))
    ]
