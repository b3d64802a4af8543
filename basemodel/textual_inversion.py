"""Textual-inversion embeddings applied to one prompt, for one encoding: nothing shared is changed.

A1111's way: an embedding's name written in a prompt (or ``embedding:name``, ComfyUI's way) stands for
its vectors. diffusers' ``load_textual_inversion`` gets there by adding tokens to the tokenizer
(``name``, ``name_1`` … for a multi-vector embedding, which ``maybe_convert_prompt`` writes out as
``"name name_1 name_2"``) and rows to the token-embedding table — both shared by every request. Here
the prompt is tokenized the way the tokenizer splits around added tokens (the text between names
tokenized on its own, one position per vector where a name stood, then truncated and padded as the
pipeline does), and while the text encoders run, a forward hook on each encoder's token embedding
writes the vectors at those positions (on the encoders the family's ``embedding_parts`` feed: the
CLIPs; T5 on SD3 and Flux reads the names as plain words, as in diffusers). The tokenizer, the
embedding table and every other request are untouched, and the result equals diffusers' with the same
file and token.

The placeholder id at those positions is the tokenizer's start token: never the end token (CLIP pools
its output at the first end token) and below it (checkpoints whose config still has the pre-2023
``eos_token_id`` 2 pool at the highest id). So the pooled output (SDXL's and SD3's ``text_embeds``,
Flux's ``pooled_projections``) is read at the end token, as in A1111 and ComfyUI; diffusers on such a
legacy config reads it at its added token's id
instead (the tiny test models and current configs are not affected).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from basemodel.families.base import ModelFamily

PREFIX = "embedding:"  # ComfyUI's prompt syntax


@dataclass(frozen=True)
class Embedding:
    """An embedding as a prompt names it: ``name`` (lowercase) and, per text encoder component
    (``text_encoder``, ``text_encoder_2``), its vectors ``[n, width]``."""

    name: str
    vectors: Mapping[str, torch.Tensor]

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def pattern(names: Iterable[str]) -> re.Pattern[str]:
    """Where ``names`` stand in a prompt as whole words, optionally as ``embedding:name`` (ComfyUI, with
    or without a ``.safetensors`` / ``.pt`` file extension); case-insensitive, as CLIP lowercases."""
    return _compiled(tuple(sorted(set(names), key=lambda name: (-len(name), name))))


@lru_cache(maxsize=256)
def _compiled(names: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(name) for name in names)  # longest first
    return re.compile(
        rf"(?<![\w@:.-])(?:{re.escape(PREFIX)})?(?P<name>{alternatives})(?:\.safetensors|\.pt)?(?![\w@-]|\.\w)",
        re.IGNORECASE,
    )


def split(text: str, embeddings: Mapping[str, Embedding]) -> list[str | Embedding]:
    """``text`` as plain pieces and the embeddings it names, in order."""
    if not embeddings or not text:
        return [text]
    pieces: list[str | Embedding] = []
    at = 0
    for match in pattern(embeddings).finditer(text):
        pieces += [text[at : match.start()], embeddings[match["name"].lower()]]
        at = match.end()
    pieces.append(text[at:])
    return pieces


def plain(text: str, embeddings: Mapping[str, Embedding]) -> str:
    """``text`` with each embedding written as its bare name (ComfyUI's ``embedding:`` and a file
    extension dropped): what the encoders that take no embeddings (T5) read, as diffusers' pipelines
    give them the prompt with the token as a plain word."""
    if not names_any(text, embeddings):
        return text
    return pattern(embeddings).sub(lambda match: match["name"], text)


def names_any(text: str, embeddings: Mapping[str, Embedding]) -> bool:
    return bool(embeddings) and bool(text) and pattern(embeddings).search(text) is not None


def token_row(
    tokenizer: Any, pieces: Sequence[str | Embedding], component: str
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Token ids ``[1, max_length]`` of ``pieces`` for one tokenizer and where each vector goes
    (position, vector) — as the pipeline's ``tokenizer(prompt, padding="max_length", truncation=True)``
    tokenizes a prompt whose names are added tokens."""
    length = int(tokenizer.model_max_length)
    empty = tokenizer("", padding="max_length", max_length=length, truncation=True).input_ids
    start, end, pad = int(empty[0]), int(empty[1]), int(empty[2])
    body: list[int] = []
    marks: list[tuple[int, torch.Tensor]] = []
    for piece in pieces:
        if isinstance(piece, str):
            body += tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
            continue
        for vector in piece.vectors.get(component, ()):
            marks.append((len(body) + 1, vector))  # + 1: after the start token
            body.append(start)
    body = body[: length - 2]
    ids = [start, *body, end] + [pad] * (length - len(body) - 2)
    return torch.tensor([ids]), [(position, v) for position, v in marks if position <= len(body)]


@contextmanager
def substituting(module: nn.Module, marks: Sequence[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While inside, ``module`` (a token embedding) outputs ``marks``' vectors at their positions, in
    every row of its input."""
    if not marks:
        yield
        return
    positions = torch.tensor([position for position, _ in marks])
    vectors = torch.stack([vector for _, vector in marks])

    def hook(_: nn.Module, __: Any, output: torch.Tensor) -> torch.Tensor:
        replaced = output.clone()
        replaced[:, positions.to(output.device)] = vectors.to(output.device, output.dtype)
        return replaced

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_text(
    family: ModelFamily, pipe: Any, text: str, embeddings: Mapping[str, Embedding]
) -> dict[str, torch.Tensor] | None:
    """``family.training_text`` of ``text`` with the embeddings it names in place (one row); None when
    it names none (the caller encodes it as usual). The encoders no embedding reaches (T5 on SD3 and
    Flux: ``frozen_text_encoders``) read the text with the names as plain words (``plain``)."""
    if not names_any(text, embeddings):
        return None
    pieces = split(text, embeddings)
    tokens: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for component, attribute in zip(family.text_encoders, family.tokenizers, strict=True):
            encoder = getattr(pipe, component)
            ids, marks = token_row(getattr(pipe, attribute), pieces, component)
            tokens[component] = ids.to(encoder.device)
            stack.enter_context(substituting(encoder.get_input_embeddings(), marks))
        if family.frozen_text_encoders:
            for component, ids in family.tokenize(pipe, [plain(text, embeddings)]).items():
                encoder = getattr(pipe, component, None)
                if component not in tokens and encoder is not None:
                    tokens[component] = ids.to(encoder.device)
        return family.training_text(pipe, tokens)
