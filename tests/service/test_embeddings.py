"""Textual-inversion embeddings through the real server: registration (A1111 and diffusers layouts,
typed refusals), per-request use in prompts and negative prompts within 1/255 of diffusers'
``load_textual_inversion`` with the same files and tokens on SD1 and SDXL, a mixed batch equal to each
request alone, the shared tokenizer and embedding table untouched, and A1111's listing and infotext."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from adapters.errors import StoreError
from adapters.identity import BaseIdentity
from adapters.registry import Registry
from adapters.sources import open_store
from basemodel.loader import BaseModel, load_base_model
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from service.lora.embeddings import EmbeddingIndex
from service.lora.resolver import StoreGate
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.test_hotswap import pixels

REQUEST: dict[str, Any] = {"steps": 2, "guidance_scale": 6.0, "seed": 7, "scheduler": "ddim"}
# (prompt, negative prompt) as sent; diffusers gets them without ComfyUI's "embedding:" prefix
PROMPTS = [
    ("a red tione circle", "blurry embedding:timulti"),  # single-vector in the prompt, multi in the negative
    ("a timulti blue square", "dark tione"),  # multi-vector in the prompt, single in the negative
]


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = folder / f"{name}.safetensors"
    path.write_bytes(save_bytes(tensors))
    return path


def post(server: Any, **overrides: Any) -> dict[str, Any]:
    with server.client() as http:
        response = http.post("/v1/generate", json={**REQUEST, **overrides})
    assert response.status_code == 200, response.text
    return dict(response.json())


def reference(pipe: Any, prompt: str, negative: str) -> np.ndarray:
    """The request in plain diffusers (``pipe`` already holds its textual inversions)."""
    pipe.scheduler = make_scheduler(REQUEST["scheduler"], pipe.scheduler.config)
    image = pipe(
        prompt.replace("embedding:", ""),
        negative_prompt=negative.replace("embedding:", "") or None,
        num_inference_steps=REQUEST["steps"],
        guidance_scale=REQUEST["guidance_scale"],
        generator=generators_for(REQUEST["seed"], 1),
        output_type="pil",
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def shared_state(pipe: Any, encoders: tuple[str, ...], tokenizers: tuple[str, ...]) -> str:
    """A hash of every tokenizer's vocabulary and every text encoder's embedding table."""
    digest = hashlib.sha256()
    for name in tokenizers:
        tokenizer = getattr(pipe, name)
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(str(len(tokenizer)).encode())
    for name in encoders:
        table = getattr(pipe, name).get_input_embeddings().weight.detach()
        digest.update(str(tuple(table.shape)).encode() + table.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sd1_files(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A1111's single-vector ``emb_params`` file and diffusers' 3-vector ``learned_embeds`` file."""
    folder = tmp_path_factory.mktemp("embeddings")
    width = base_model.pipe.text_encoder.config.hidden_size
    return {
        "tione": write(folder, "tione", {"emb_params": vectors(1, width, 1)}),
        "timulti": write(folder, "timulti", {"<cat-toy>": vectors(3, width, 2)}),
    }


def test_sd1_embeddings_match_load_textual_inversion(
    start_server: Any,
    base_model: Any,
    registry: Registry,
    sd1_files: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    pipe = base_model.pipe
    before = shared_state(pipe, ("text_encoder",), ("tokenizer",))
    server = start_server(store=registry.store.uri)
    with server.client() as http:
        for name, path in sd1_files.items():
            created = http.post(
                "/v1/adapters", data={"id": name}, files={"file": (path.name, path.read_bytes())}
            )
            assert created.status_code == 201, created.text
            assert created.json()["kind"] == "embedding"
        listed = http.get("/sdapi/v1/embeddings").json()
        loras = http.get("/sdapi/v1/loras").json()
    assert set(listed["loaded"]) == {"tione", "timulti"} and listed["skipped"] == {}
    assert listed["loaded"]["timulti"]["vectors"] == 3 and listed["loaded"]["tione"]["vectors"] == 1
    assert listed["loaded"]["tione"]["shape"] == pipe.text_encoder.config.hidden_size
    assert loras == []  # embeddings are no LoRAs

    theirs = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    theirs.set_progress_bar_config(disable=True)
    plain = reference(theirs, *PROMPTS[0])  # the ids as plain words
    for name, path in sd1_files.items():
        theirs.load_textual_inversion(str(path), token=name)
    served = []
    for prompt, negative in PROMPTS:
        body = post(server, prompt=prompt, negative_prompt=negative)
        served.append(pixels(body["images"][0]))
        assert np.abs(served[-1] - reference(theirs, prompt, negative)).max() <= 1, prompt
        assert sorted(e["name"] for e in body["embeddings"]) == ["timulti", "tione"]
        assert body["adapters"] == []
    assert np.abs(served[0] - plain).mean() > 2, "the vectors must change the image"
    # with a LoRA in the same request (the usual LoRA + negative embedding): both apply, as in diffusers
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(save_bytes(diffusers_layout(make_case(pipe))))
    registry.register(lora, "style")
    theirs.load_lora_weights(str(lora), adapter_name="style")
    theirs.set_adapters(["style"], [0.8])
    prompt, negative = PROMPTS[0]
    both = post(server, prompt=f"{prompt} <lora:style:0.8>", negative_prompt=negative)
    assert [a["id"] for a in both["adapters"]] == ["style"] and len(both["embeddings"]) == 2
    assert np.abs(pixels(both["images"][0]) - reference(theirs, prompt, negative)).max() <= 1
    # the PNG and the parameters name them with their hashes, as A1111 writes 'TI hashes'
    png: Any = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))
    text = png.text["parameters"]
    sha = {name: registry.resolve(name).sha256[:12] for name in sd1_files}
    assert f'TI hashes: "timulti: {sha["timulti"]}, tione: {sha["tione"]}"' in text
    assert body["parameters"]["ti_hashes"] == f"timulti: {sha['timulti']}, tione: {sha['tione']}"
    assert shared_state(pipe, ("text_encoder",), ("tokenizer",)) == before


def test_mixed_batch_with_and_without_an_embedding_equals_each_alone(
    start_server: Any, registry: Registry, sd1_files: dict[str, Path]
) -> None:
    for name, path in sd1_files.items():
        registry.register(path, name)
    requests = [
        {"prompt": "a red timulti circle", "negative_prompt": "tione", "seed": 1},
        {"prompt": "a blue square", "seed": 2},
    ]
    alone_server = start_server(store=registry.store.uri, max_batch_size=1)
    alone = [post(alone_server, **r) for r in requests]
    alone_server.stop()
    server = start_server(store=registry.store.uri, max_batch_size=2, batch_window_ms=1500)
    post(server, **requests[0])  # resident first, so that no cold load splits the batch
    with ThreadPoolExecutor(max_workers=2) as pool:
        batched = list(pool.map(lambda r: post(server, **r), requests))
    with server.client() as http:
        metrics = http.get("/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('loraswap_batch_size_bucket{le="1.0"}')]
    count = [line for line in metrics.splitlines() if line.startswith("loraswap_batch_size_count")]
    assert float(sizes[0].split()[-1]) < float(count[0].split()[-1]), "the two requests were not batched"
    for one, many in zip(alone, batched, strict=True):
        assert np.abs(pixels(one["images"][0]) - pixels(many["images"][0])).max() <= 2
    assert [e["name"] for e in batched[0]["embeddings"]] == ["timulti", "tione"]
    assert batched[1]["embeddings"] == []


def test_embeddings_are_refused_where_they_do_not_fit(
    start_server: Any, base_model: Any, registry: Registry, sd1_files: dict[str, Path]
) -> None:
    width = base_model.pipe.text_encoder.config.hidden_size
    registry.register(sd1_files["tione"], "tione")
    registry.register(save_bytes(diffusers_layout(make_case(base_model.pipe))), "style")
    server = start_server(store=registry.store.uri)
    files = {
        "sdxl": save_bytes({"clip_l": vectors(2, width, 3), "clip_g": vectors(2, 32, 4)}),
        "wide": save_bytes({"emb_params": vectors(2, 768, 5)}),
        "long": save_bytes({"emb_params": vectors(76, width, 6)}),
        "nan": save_bytes({"emb_params": torch.full((1, width), float("nan"))}),
        "pickle": b"\x80\x04\x95" + b"\x00" * 64,  # a .pt file's pickle opcodes
    }
    with server.client() as http:
        answers = {
            name: http.post(
                "/v1/adapters",
                data={"id": name},
                files={"file": (f"{name}.{'pt' if name == 'pickle' else 'safetensors'}", data)},
            )
            for name, data in files.items()
        }
        as_adapter = http.post("/v1/generate", json={**REQUEST, "prompt": "x", "adapters": [{"id": "tione"}]})
        lora_as_embedding = http.post("/v1/generate", json={**REQUEST, "prompt": "a embedding:style"})
        unknown = http.post("/v1/generate", json={**REQUEST, "prompt": "a embedding:nothere"})
        many = " ".join(f"embedding:e{i}" for i in range(17))
        too_many = http.post("/v1/generate", json={**REQUEST, "prompt": "a", "negative_prompt": many})
        listed = http.get("/v1/adapters").json()
    reasons = {
        name: (r.status_code, r.json()["error"]["detail"].get("reason")) for name, r in answers.items()
    }
    assert reasons["sdxl"] == (409, "family_mismatch"), answers["sdxl"].text
    assert reasons["wide"] == (409, "shape_mismatch")
    assert "768 wide (as SD1.x" in answers["wide"].json()["error"]["message"]
    assert reasons["long"] == (422, "too_many_vectors")
    assert reasons["nan"] == (422, "non_finite")
    assert answers["pickle"].status_code in (415, 422) and answers["pickle"].json()["error"]["type"] == (
        "adapter_unsafe_format"
    )
    assert {a["adapter_id"] for a in listed["adapters"]} == {"tione", "style"}  # nothing else stored
    assert as_adapter.status_code == 422 and as_adapter.json()["error"]["detail"]["kind"] == "embedding"
    assert (
        lora_as_embedding.status_code == 422 and "not a textual-inversion embedding" in lora_as_embedding.text
    )
    assert unknown.status_code == 404
    assert too_many.status_code == 422 and too_many.json()["error"]["detail"]["limit"] == 16


@pytest.fixture(scope="module")
def sdxl(loraswap_home: Path) -> BaseModel:
    return load_base_model("tiny-sdxl-random", loraswap_home / "models", device="cpu", dtype="fp32")


def test_sdxl_embeddings_match_load_textual_inversion_on_both_encoders(
    start_server: Any, sdxl: BaseModel, tmp_path: Path
) -> None:
    pipe: Any = sdxl.pipe
    wide = {"clip_l": pipe.text_encoder.config.hidden_size, "clip_g": pipe.text_encoder_2.config.hidden_size}
    files = {
        "tione": write(
            tmp_path, "tione", {k: vectors(1, w, 10 + i) for i, (k, w) in enumerate(wide.items())}
        ),
        "timulti": write(
            tmp_path, "timulti", {k: vectors(3, w, 20 + i) for i, (k, w) in enumerate(wide.items())}
        ),
    }
    registry = Registry(open_store(str(tmp_path / "store")), BaseIdentity.from_base_model(sdxl))
    for name, path in files.items():
        registry.register(path, name)
    encoders, tokenizers = ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")
    before = shared_state(pipe, encoders, tokenizers)
    server = start_server(loader=lambda _: sdxl, store=registry.store.uri)
    with server.client() as http:
        listed = http.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["timulti"]["shape"] == sum(wide.values())

    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl.ref.path, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    plain = reference(theirs, *PROMPTS[1])  # the ids as plain words

    for name, path in files.items():
        tensors = load_file(path)
        theirs.load_textual_inversion(
            tensors["clip_l"], token=name, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
        )
        theirs.load_textual_inversion(
            tensors["clip_g"], token=name, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
        )
    for prompt, negative in PROMPTS:
        body = post(server, prompt=prompt, negative_prompt=negative)
        served = pixels(body["images"][0])
        assert np.abs(served - reference(theirs, prompt, negative)).max() <= 1, prompt
    assert np.abs(served - plain).mean() > 2, "the vectors must change the image"
    assert shared_state(pipe, encoders, tokenizers) == before


def test_embedding_index_survives_a_failing_store_and_follows_changes() -> None:
    """Bare ids come from a listing reused for its TTL (refreshed in the background after it); a store
    that cannot be listed makes none known instead of failing the request; registrations through this
    server apply at once."""

    class Listing:
        def __init__(self) -> None:
            self.items: list[Any] = []
            self.fail = False
            self.calls = 0

        def list(self) -> list[Any]:
            self.calls += 1
            if self.fail:
                raise StoreError("the store is down", reason="unavailable")
            return self.items

    def summary(adapter_id: str, kind: str) -> Any:
        return SimpleNamespace(adapter_id=adapter_id, latest=SimpleNamespace(kind=kind))

    now = [0.0]
    store = Listing()
    gate = StoreGate(lambda: 1)
    index = EmbeddingIndex(store, gate, ttl_s=10, clock=lambda: now[0])  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    store.fail = True
    assert asyncio.run(index.ids(deadline)) == frozenset()
    store.fail, store.items = False, [summary("neg", "embedding"), summary("style", "lora")]
    assert asyncio.run(index.ids(deadline)) == {"neg"}
    calls = store.calls
    index.registered(SimpleNamespace(adapter_id="fresh", kind="embedding"))  # type: ignore[arg-type]
    assert asyncio.run(index.ids(deadline)) == {"neg", "fresh"} and store.calls == calls  # no listing
    now[0] = 11.0  # past the TTL: the old list at once, a listing in the background
    store.items = [summary("neg", "embedding"), summary("fresh", "embedding"), summary("x", "embedding")]
    assert asyncio.run(index.ids(deadline)) == {"neg", "fresh"}
    index.refresh().result(timeout=5)
    assert asyncio.run(index.ids(deadline)) == {"neg", "fresh", "x"}
    gate.close()
