"""Textual-inversion embeddings on the transformer families through the real server: Flux.1's CLIP-L
takes SD1-style files (A1111 ``emb_params``, diffusers ``learned_embeds``) and SDXL files' ``clip_l``
(= ``FluxPipeline.load_textual_inversion`` within 1/255, prompt and true-CFG negative prompt); SD3's two
CLIPs take SDXL files (= a reference built by hand as ``load_textual_inversion`` builds SDXL's, within
1/255); T5 takes none (its vectors are dropped, a file with only them refused); ``embedding:id`` and
``/sdapi/v1/embeddings`` as on the other families."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from basemodel.loader import BaseModel
from service.engine.sampler import generators_for
from service.engine.schedulers import make_scheduler
from tests.adapters.conftest import save_bytes
from tests.service import mmdit
from tests.service.test_embeddings import shared_state, vectors, write

BASE = {"steps": 2, "seed": 5, "width": 32, "height": 32, "scheduler": "euler"}


def register(server: Any, files: dict[str, bytes]) -> dict[str, Any]:
    """POST each file as an adapter: id → the response."""
    with server.client() as http:
        return {
            name: http.post("/v1/adapters", data={"id": name}, files={"file": (f"{name}.safetensors", data)})
            for name, data in files.items()
        }


def render(pipe: Any, prompt: str, **kwargs: Any) -> np.ndarray:
    pipe.scheduler = make_scheduler(BASE["scheduler"], pipe.scheduler.config, flow_matching=True)
    image = pipe(
        prompt,
        width=BASE["width"],
        height=BASE["height"],
        num_inference_steps=BASE["steps"],
        generator=generators_for(BASE["seed"], 1),
        output_type="pil",
        **kwargs,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_flux_clip_l_takes_sd1_style_and_sdxl_clip_l_embeddings_as_load_textual_inversion(
    start_server: Any, flux: BaseModel, tmp_path: Path
) -> None:
    pipe: Any = flux.pipe
    width, t5 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.d_model
    files = {
        "tione": write(tmp_path, "tione", {"emb_params": vectors(1, width, 1)}),
        "timulti": write(tmp_path, "timulti", {"<cat-toy>": vectors(3, width, 2)}),
        # an SDXL file with ComfyUI's T5 vectors: CLIP-L takes clip_l, clip_g and t5xxl are dropped
        "tixl": write(
            tmp_path,
            "tixl",
            {"clip_l": vectors(2, width, 3), "clip_g": vectors(2, 32, 4), "t5xxl": vectors(2, t5, 5)},
        ),
    }
    before = shared_state(pipe, ("text_encoder",), ("tokenizer",))
    server = start_server(loader=lambda _: flux, store=mmdit.store_with(flux, {}, tmp_path / "store"))
    created = register(server, {name: path.read_bytes() for name, path in files.items()})
    refused = register(
        server,
        {
            "only-t5": save_bytes({"t5xxl": vectors(1, t5, 6)}),
            "wide": save_bytes({"emb_params": vectors(1, width + 8, 7)}),
            "for-sdxl": save_bytes({"text_encoder_2.embedding": vectors(1, width, 8)}),  # canonical
        },
    )
    assert all(r.status_code == 201 and r.json()["kind"] == "embedding" for r in created.values())
    assert created["tixl"].json()["rank"] == 2
    reasons = {name: (r.status_code, r.json()["error"]["detail"]["reason"]) for name, r in refused.items()}
    assert reasons == {
        "only-t5": (422, "t5_only"),
        "wide": (409, "shape_mismatch"),
        "for-sdxl": (409, "family_mismatch"),
    }
    assert "T5" in refused["only-t5"].json()["error"]["message"]
    with server.client() as http:
        listed = http.get("/sdapi/v1/embeddings").json()
    assert set(listed["loaded"]) == set(files) and listed["loaded"]["tixl"]["shape"] == width

    theirs: Any = FluxPipeline.from_pretrained(flux.ref.path)
    theirs.set_progress_bar_config(disable=True)
    cases = [  # (prompt, negative prompt, true CFG scale) as sent; diffusers gets them without "embedding:"
        ("a red tione circle", "blurry embedding:timulti", 2.0),
        ("a tixl blue square", "", 1.0),
    ]
    plain = render(theirs, cases[1][0], guidance_scale=3.5)  # the ids as plain words
    for name in ("tione", "timulti"):
        theirs.load_textual_inversion(str(files[name]), token=name)
    clip_l = load_file(files["tixl"])["clip_l"]
    theirs.load_textual_inversion(
        clip_l, token="tixl", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
    )
    for prompt, negative, cfg in cases:
        body = mmdit.generate(
            server, BASE, prompt=prompt, negative_prompt=negative, guidance_scale=3.5, true_cfg_scale=cfg
        ).json()
        served = mmdit.pixels(body["images"][0])
        expected = render(
            theirs,
            prompt,
            negative_prompt=negative.replace("embedding:", "") or None,
            true_cfg_scale=cfg,
            guidance_scale=3.5,
        )
        assert np.abs(served - expected).max() <= 1, prompt
        assert {e["name"] for e in body["embeddings"]} == set(re.findall(r"ti\w+", prompt + negative))
    assert np.abs(served - plain).mean() > 2, "the vectors must change the image"
    assert shared_state(pipe, ("text_encoder",), ("tokenizer",)) == before


def add_by_hand(tokenizer: Any, encoder: Any, name: str, rows: torch.Tensor) -> str:
    """What ``load_textual_inversion`` does for one encoder: ``name``, ``name_1`` … added to the
    tokenizer, their rows written into the encoder's input embeddings; the words they stand for."""
    tokens = [name] + [f"{name}_{i}" for i in range(1, rows.shape[0])]
    tokenizer.add_tokens(tokens)
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)] = rows
    return " ".join(tokens)


def test_sd3_clips_take_sdxl_embeddings_as_a_hand_built_reference(
    start_server: Any, sd3: BaseModel, tmp_path: Path
) -> None:
    pipe: Any = sd3.pipe
    wide = {"clip_l": pipe.text_encoder.config.hidden_size, "clip_g": pipe.text_encoder_2.config.hidden_size}
    files = {
        name: {part: vectors(count, w, 10 * count + i) for i, (part, w) in enumerate(wide.items())}
        for name, count in (("tione", 1), ("timulti", 3))
    }
    encoders, tokenizers = ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")
    before = shared_state(pipe, encoders, tokenizers)
    server = start_server(loader=lambda _: sd3, store=mmdit.store_with(sd3, {}, tmp_path / "store"))
    created = register(server, {name: save_bytes(tensors) for name, tensors in files.items()})
    t5 = {"t5xxl": vectors(3, pipe.text_encoder_3.config.d_model, 9)}  # ComfyUI's: dropped
    more = register(
        server,
        {
            "sd1": save_bytes({"emb_params": vectors(1, wide["clip_l"], 7)}),
            "with-t5": save_bytes({**files["timulti"], **t5}),
        },
    )
    assert all(r.status_code == 201 for r in created.values()), created
    assert (
        more["sd1"].status_code == 409
        and more["sd1"].json()["error"]["detail"]["reason"] == "family_mismatch"
    )
    assert more["with-t5"].status_code == 201 and more["with-t5"].json()["rank"] == 3
    with server.client() as http:
        listed = http.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["timulti"]["shape"] == sum(wide.values())

    theirs: Any = StableDiffusion3Pipeline.from_pretrained(sd3.ref.path)
    theirs.set_progress_bar_config(disable=True)
    prompt, negative = "a timulti blue square", "dark embedding:tione"
    plain = render(theirs, prompt, guidance_scale=5.0)
    words = {}
    for name, tensors in files.items():
        for (part, rows), encoder, tokenizer in zip(tensors.items(), encoders, tokenizers, strict=True):
            assert part == ("clip_l" if encoder == "text_encoder" else "clip_g")
            words[name] = add_by_hand(getattr(theirs, tokenizer), getattr(theirs, encoder), name, rows)

    def clip(text: str) -> str:  # the CLIP prompts with each name written out as its tokens
        return re.sub(r"(?:embedding:)?(ti\w+)", lambda m: words[m[1]], text)

    body = mmdit.generate(server, BASE, prompt=prompt, negative_prompt=negative, guidance_scale=5.0).json()
    served = mmdit.pixels(body["images"][0])
    expected = render(
        theirs,
        clip(prompt),
        prompt_2=clip(prompt),
        prompt_3=prompt,  # T5 reads the names as plain words
        negative_prompt=clip(negative),
        negative_prompt_2=clip(negative),
        negative_prompt_3=negative.replace("embedding:", ""),
        guidance_scale=5.0,
    )
    assert np.abs(served - expected).max() <= 1
    assert np.abs(served - plain).mean() > 2, "the vectors must change the image"
    assert [e["name"] for e in body["embeddings"]] == ["timulti", "tione"]
    assert shared_state(pipe, encoders, tokenizers) == before
