"""Textual-inversion files: every accepted layout becomes the same canonical vectors, export gives A1111's
layout back, and files that do not fit the base's text encoders are refused with typed errors; prompts
find embeddings as A1111 and ComfyUI write them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapters.errors import AdapterIncompatible, AdapterInvalid
from adapters.format import read_adapter, write_kohya
from adapters.metadata import AdapterMetadata
from adapters.normalise import normalise
from adapters.registry import Registry
from basemodel.textual_inversion import Embedding, split, token_row
from service.lora.embeddings import named
from tests.adapters.conftest import save_bytes
from tests.adapters.sgm_factory import tiny_sdxl


def vectors(count: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def width_of(base_model: Any) -> int:
    return int(base_model.pipe.text_encoder.config.hidden_size)


def test_sd1_layouts_become_the_same_vectors(base_model: Any) -> None:
    width, arch = width_of(base_model), base_model.architecture
    one = vectors(1, width)
    for tensors, layout in [
        ({"emb_params": one}, "a1111"),
        ({"<cat-toy>": one}, "diffusers"),
        ({"sks": one[0]}, "diffusers"),  # a single vector stored 1-D (older textual_inversion.py runs)
        ({"text_encoder.embedding": one}, "loraswap"),
    ]:
        canonical, info = normalise(tensors, arch)
        assert list(canonical) == ["text_encoder.embedding"], layout
        assert torch.equal(canonical["text_encoder.embedding"], one)
        assert (info.kind, info.source_format, info.summary()["rank"]) == ("embedding", layout, 1)


def test_sdxl_file_and_a1111_export_round_trip() -> None:
    xl: Any = tiny_sdxl()
    clip_l = vectors(2, xl.text_encoder.config.hidden_size, 1)
    clip_g = vectors(2, xl.text_encoder_2.config.hidden_size, 2)
    canonical, info = normalise({"clip_l": clip_l, "clip_g": clip_g}, xl.architecture)
    assert info.target_modules == ["text_encoder.embedding", "text_encoder_2.embedding"]
    meta = AdapterMetadata(**info.summary(), source_format="a1111")
    exported, header = read_adapter(write_kohya(None, canonical, meta, xl.architecture))
    assert sorted(exported) == ["clip_g", "clip_l"]
    assert header["modelspec.architecture"].endswith("/textual-inversion")
    assert torch.equal(exported["clip_l"], clip_l) and torch.equal(exported["clip_g"], clip_g)
    with pytest.raises(AdapterIncompatible) as one_encoder:  # an SD1.x embedding on SDXL
        normalise({"emb_params": clip_l}, xl.architecture)
    assert one_encoder.value.reason == "family_mismatch"
    with pytest.raises(AdapterInvalid) as only_g:
        normalise({"clip_g": clip_g}, xl.architecture)
    assert only_g.value.reason == "incomplete_pair"
    with pytest.raises(AdapterInvalid) as counts:
        normalise({"clip_l": clip_l, "clip_g": clip_g[:1]}, xl.architecture)
    assert counts.value.reason == "shape_mismatch"


def test_an_embedding_is_versioned_and_nothing_is_stored_when_it_does_not_fit(
    registry: Registry, base_model: Any
) -> None:
    width = width_of(base_model)
    first = registry.register(save_bytes({"emb_params": vectors(2, width, 3)}), "neg")
    again = registry.register(save_bytes({"emb_params": vectors(2, width, 3)}), "neg")
    second = registry.register(save_bytes({"<neg>": vectors(4, width, 4)}), "neg")
    assert (first.version, again.version, second.version) == (1, 1, 2)
    assert (second.kind, second.rank, second.components, second.source_format) == (
        "embedding",
        4,
        ["text_encoder"],
        "diffusers",
    )
    assert registry.open("neg@1").tensors["text_encoder.embedding"].shape == (2, width)
    for tensors, reason in [
        ({"emb_params": vectors(2, 1024)}, "shape_mismatch"),  # an SD2.x embedding
        ({"emb_params": vectors(2, width + 1)[None]}, "shape_mismatch"),  # 3-D
        ({"emb_params": torch.zeros(2, width, dtype=torch.int32)}, "unsupported_dtype"),
    ]:
        with pytest.raises((AdapterIncompatible, AdapterInvalid)) as refused:
            registry.register(save_bytes(tensors), "bad")
        assert refused.value.reason == reason
    assert [s.adapter_id for s in registry.list()] == ["neg"]


def test_prompts_name_embeddings_as_a1111_and_comfyui_write_them(base_model: Any) -> None:
    texts = [
        "a NEG photo, embedding:other.safetensors, (neg:1.2), negative, neg.",
        "embedding:pinned@2 not-neg neg_x neg.x",
    ]
    assert named(texts, ["neg"]) == ["neg", "other", "pinned@2"]
    vec = {"text_encoder": vectors(3, width_of(base_model))}
    emb = {"neg": Embedding("neg", vec), "other@2": Embedding("other@2", vec)}
    pieces = split("a neg, embedding:Other@2 b", emb)
    assert pieces == ["a ", emb["neg"], ", ", emb["other@2"], " b"]
    tokenizer = base_model.pipe.tokenizer
    ids, marks = token_row(tokenizer, pieces, "text_encoder")
    assert ids.shape == (1, tokenizer.model_max_length) and [p for p, _ in marks] == [2, 3, 4, 6, 7, 8]
    long = token_row(tokenizer, ["a " * 73, emb["neg"]], "text_encoder")[1]
    assert [p for p, _ in long] == [74, 75]  # truncated with the prompt: 75 tokens between start and end


def test_t5_vectors_are_dropped_and_a_t5_only_file_is_refused() -> None:
    """ComfyUI's SD3/Flux files may carry ``t5xxl`` vectors: no T5 takes embeddings, so they are dropped
    beside CLIP parts, and a file with nothing else is refused with its own reason."""
    clip_l, clip_g, t5 = vectors(2, 8, 1), vectors(2, 12, 2), vectors(2, 16, 3)
    canonical, info = normalise({"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}, None)
    assert info.kind == "embedding" and sorted(canonical) == [
        "text_encoder.embedding",
        "text_encoder_2.embedding",
    ]
    assert torch.equal(canonical["text_encoder.embedding"], clip_l)
    for key in ("t5xxl", "t5"):
        with pytest.raises(AdapterInvalid) as only_t5:
            normalise({key: t5}, None)
        assert only_t5.value.reason == "t5_only" and "T5" in str(only_t5.value)
