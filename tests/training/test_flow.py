"""Training on the flow-matching transformer families (tiny-flux-random, tiny-sd3-random, fp32, CPU).

The objective is diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``'s:
timesteps drawn as ``compute_density_for_timestep_sampling``, noisy = (1−σ)·x₀ + σ·ε, target ε − x₀,
``compute_loss_weighting_for_sd3``; Flux trains with its guidance embedding at ``--train-guidance`` on
packed latents. Their default transformer targets, the CLIP LoRA (never T5), the text cache (T5
included), resume equal to an uninterrupted run, and the export: registered with ``--register`` it
serves at once, as diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights`` draws it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors.torch import load_file

from adapters.format import read_adapter
from adapters.metadata import parse_header_metadata
from basemodel.families import get_family
from basemodel.families.flux.tiny import build_tiny_flux_pipeline
from basemodel.families.sd3.tiny import build_tiny_sd3_pipeline
from basemodel.loader import BaseModel, load_base_model
from tests.service import test_flux, test_sd3
from tests.service.conftest import start_server  # noqa: F401  (fixture)
from tests.training.conftest import make_config
from tests.training.resume import assert_resume_matches
from training.conditioning import Conditioner
from training.data.synth import synth_dataset
from training.errors import TrainConfigError
from training.flow import FlowObjective
from training.run import train
from training.setup import for_family

FLUX, SD3 = "tiny-flux-random", "tiny-sd3-random"
FAST_FLOW: dict[str, Any] = {"batch_size": 2, "sample_steps": 2, "eval_samples": 2, "val_timesteps": 2}
# train_dreambooth_lora_flux.py's default lora_layers
FLUX_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


@pytest.fixture(scope="module")
def flow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training + 2 validation 32-px images."""
    folder = tmp_path_factory.mktemp("flow-data") / "neon"
    synth_dataset(folder, n=4, val=2, style="neon", size=32, seed=3)
    return folder


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none", "cosmap", "sigma_sqrt"])
def test_flow_objective_is_the_scripts(scheme: str) -> None:
    """u from our generator equals diffusers' helper on the same seed; the index picks timestep and σ
    of the base's FlowMatch schedule (SD3: shift 3); noisy, target and weights as the scripts compute."""
    pipe = build_tiny_sd3_pipeline()
    config = make_config(Path("."), Path("."), weighting_scheme=scheme, logit_mean=0.2, logit_std=0.9)
    objective = FlowObjective(dict(pipe.scheduler.config), config)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(7)
    noised = objective.draw(latents, generator)

    replay = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=replay)
    torch.random.set_rng_state(replay.get_state())  # diffusers draws u from the global RNG
    u = compute_density_for_timestep_sampling(scheme, 3, logit_mean=0.2, logit_std=0.9, mode_scale=1.29)
    indices = (u * 1000).long()
    timesteps = pipe.scheduler.timesteps[indices]
    sigmas = pipe.scheduler.sigmas[indices]
    torch.testing.assert_close(noised.timesteps, timesteps.float(), rtol=0, atol=0)
    sigma = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.noisy, (1.0 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(noised.target, noise - latents)
    weights = compute_loss_weighting_for_sd3(scheme, sigma).flatten()
    if noised.weights is None:
        assert torch.all(weights == 1)
    else:
        torch.testing.assert_close(noised.weights.float(), weights.float())
    assert noised.timesteps.max() <= 1000 and noised.timesteps.min() > 0


def test_training_text_is_what_the_pipelines_encode() -> None:
    """Cached text conditioning = ``encode_prompt``'s: Flux (T5 states, CLIP pooled, 512 tokens on dev)
    and SD3 (CLIPs padded to T5's width, then T5; both pooled projections)."""
    captions = ["a red circle", "a blue square on a green background"]
    flux = build_tiny_flux_pipeline()
    conditioner = Conditioner(get_family("flux"), flux)
    with torch.no_grad():
        text = conditioner.encode_text(conditioner.tokenize(captions))
        hidden, pooled, _ = flux.encode_prompt(captions, None, device="cpu", max_sequence_length=512)
    assert set(text) == {"hidden", "pooled_projections"} and text["hidden"].shape[1] == 512
    torch.testing.assert_close(text["hidden"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(text["pooled_projections"], pooled, rtol=0, atol=0)
    with torch.no_grad():  # T5's part cached apart (while a CLIP LoRA trains) gives the same
        tokens = conditioner.tokenize(captions)
        split = conditioner.encode_text(tokens, conditioner.encode_frozen(tokens))
    torch.testing.assert_close(split["hidden"], hidden, rtol=0, atol=0)

    sd3 = build_tiny_sd3_pipeline()
    conditioner = Conditioner(get_family("sd3"), sd3)
    with torch.no_grad():
        text = conditioner.encode_text(conditioner.tokenize(captions))
        hidden, _, pooled, _ = sd3.encode_prompt(
            captions, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=256
        )
        tokens = conditioner.tokenize(captions)
        split = conditioner.encode_text(tokens, conditioner.encode_frozen(tokens))
    torch.testing.assert_close(split["hidden"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(text["hidden"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(text["pooled_projections"], pooled, rtol=0, atol=0)


def test_family_defaults_and_refusals(flow_data: Path) -> None:
    """Unset options take the family's: the scripts' targets and weighting, the samples' guidance;
    noise-prediction options are refused on flow bases and the weighting scheme on DDPM ones."""
    config = make_config(flow_data, flow_data / "out")
    flux, sd3 = for_family(config, get_family("flux")), for_family(config, get_family("sd3"))
    assert flux.target_modules == FLUX_TARGETS and flux.weighting_scheme == "none"
    assert flux.guidance_scale == 3.5 and sd3.guidance_scale == 7.0
    assert sd3.weighting_scheme == "logit_normal" and "attn.add_q_proj" in sd3.target_modules
    assert for_family(config, get_family("sd1")).target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    given = make_config(flow_data, flow_data / "out", target_modules=["to_q"], weighting_scheme="mode")
    assert for_family(given, get_family("flux")).target_modules == ["to_q"]
    with pytest.raises(TrainConfigError, match="--snr-gamma"):
        for_family(make_config(flow_data, flow_data / "out", snr_gamma=5.0), get_family("flux"))
    with pytest.raises(TrainConfigError, match="flow-matching"):
        for_family(given, get_family("sdxl"))


@pytest.fixture(scope="module")
def flux_trained(loraswap_home: Path, flow_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Transformer + CLIP LoRA on tiny-flux-random: validation, samples, checkpoints, disk cache,
    export and registration."""
    root = tmp_path_factory.mktemp("flux-trained")
    config = make_config(
        flow_data,
        root / "run",
        **FAST_FLOW,
        base_model=FLUX,
        steps=4,
        lr=3e-2,
        train_text_encoder=True,
        buckets=True,
        random_flip=True,
        validate_every=2,
        sample_every=2,
        checkpoint_every=2,
        cache="disk",
        sample_prompts=["a neon circle"],
        register_id="flux-style",
        store=str(root / "store"),
    )
    return train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)


def test_flux_lora_run(flux_trained: Any) -> None:
    out: Path = flux_trained.output
    report, plan = flux_trained.report, flux_trained.plan
    assert report is not None and plan["base_model"]["family"] == "flux"
    # one double block (8 attention + 4 MLP Linears) + the single block's to_q/k/v; CLIP: 2 layers x 4
    assert plan["modules"] == {"transformer": 15, "text_encoder": 8}
    assert plan["lora"]["target_modules"] == FLUX_TARGETS
    assert plan["objective"] == {"kind": "flow_matching", "weighting_scheme": "none", "train_guidance": 1.0}
    assert report["hyperparameters"]["prediction_type_effective"] == "flow_matching"
    assert report["hyperparameters"]["train_guidance"] == 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [0, 2, 4]
    assert (out / "samples" / "step-00000002.png").is_file() and (out / "samples" / "final.png").is_file()
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == [
        "step-00000002",
        "step-00000004",
    ]
    assert report["evaluation"]["base_weights_unchanged"] is True
    # CLIP trains: its part is computed per step, T5's states are cached (512 tokens on dev)
    latents = list((out / "cache" / "latents").glob("*.safetensors"))
    assert latents and not (out / "cache" / "text").exists()
    frozen = list((out / "cache" / "frozen").glob("*.safetensors"))
    assert frozen and set(load_file(frozen[0])) == {"t5"} and load_file(frozen[0])["t5"].shape == (512, 32)

    tensors, header = read_adapter(flux_trained.adapter_path)
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer", "text_encoder"}
    assert header["modelspec.architecture"].startswith("flux-1") and header[
        "modelspec.architecture"
    ].endswith("/lora")
    assert header["ss_base_model_version"].startswith("flux1")
    meta = parse_header_metadata(header)
    assert meta is not None and meta.base_model is not None and meta.base_model.family == "flux"
    assert meta.inference is not None and meta.inference.guidance_scale == 3.5
    assert flux_trained.ref == "flux-style@1"


@pytest.fixture(scope="module")
def flux(loraswap_home: Path) -> BaseModel:
    return load_base_model(FLUX, loraswap_home / "models", device="cpu", dtype="fp32")


def test_trained_flux_adapter_serves_as_flux_pipeline_draws_it(
    flux_trained: Any, flux: BaseModel, start_server: Any
) -> None:
    """The exported file in ``FluxPipeline.load_lora_weights`` and the registered version served by our
    server: the same pixels within 1/255, and not the base's."""
    store = flux_trained.report["hyperparameters"]["store"]
    server = start_server(loader=lambda _: flux, store=store)
    request = {"prompt": "a neon circle"}
    plain = test_flux.images(server, **request)
    ours = test_flux.images(server, **request, adapters=[{"id": "flux-style"}])
    theirs = test_flux.diffusers_reference(flux.ref.path, [(flux_trained.adapter_path, 1.0)], **request)
    assert test_flux.max_diff(ours, theirs) <= 1
    assert test_flux.max_diff(ours, plain) > 2, "the trained adapter must change the image"


RESUME: dict[str, Any] = FAST_FLOW | {
    "base_model": SD3,
    "steps": 3,
    "random_flip": True,
    "train_text_encoder": True,
    "dropout": 0.1,
    "lr": 5e-3,
    "lr_scheduler": "cosine",
    "weighting_scheme": "mode",
    "validate_every": 2,
    "val_timesteps": 1,
    "eval_samples": 0,
    "sample_steps": 1,
    "sample_prompts": ["a neon circle"],
    "export": False,
}


def test_sd3_resume_reaches_the_same_weights(loraswap_home: Path, flow_data: Path, tmp_path: Path) -> None:
    """SD3 with both CLIP LoRAs and T5 recomputed per step: stopped at step 2 and resumed, the run
    ends with the weights, metrics and validation loss of an uninterrupted one."""
    run = assert_resume_matches(flow_data, tmp_path, RESUME, models_dir=loraswap_home / "models", stop_at=2)
    assert any(k.startswith("text_encoder_2.") for k in run.adapter)


def test_sd3_transformer_lora_trains_registers_and_serves(
    loraswap_home: Path, flow_data: Path, tmp_path: Path, start_server: Any
) -> None:
    """The scripts' SD3 targets, T5 cached with the CLIPs; the registered adapter serves at once as
    ``StableDiffusion3Pipeline.load_lora_weights`` draws the exported file."""
    config = make_config(
        flow_data,
        tmp_path / "run",
        **(FAST_FLOW | {"eval_samples": 0}),
        base_model=SD3,
        steps=3,
        lr=3e-2,
        cache="disk",
        register_id="sd3-style",
        store=str(tmp_path / "store"),
    )
    result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    assert result.plan["modules"] == {"transformer": 15, "text_encoder": 0, "text_encoder_2": 0}
    assert (
        result.report is not None and result.report["hyperparameters"]["weighting_scheme"] == "logit_normal"
    )
    entries = list((tmp_path / "run" / "cache" / "text").glob("*.safetensors"))
    assert entries and set(load_file(entries[0])) == {"hidden", "pooled_projections"}
    assert load_file(entries[0])["hidden"].shape[0] == 77 + 256  # CLIP tokens, then T5's
    assert result.adapter_path is not None
    tensors, header = read_adapter(result.adapter_path)
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer"}
    assert header["modelspec.architecture"].startswith("stable-diffusion-3")
    # sd-scripts' names for the variant (what readers recognise as SD3)
    assert header["ss_base_model_version"] in get_family("sd3").interop_aliases("ss_base_model_version")

    sd3 = load_base_model(SD3, loraswap_home / "models", device="cpu", dtype="fp32")
    server = start_server(loader=lambda _: sd3, store=str(tmp_path / "store"))
    request = {"prompt": "a neon circle"}
    plain = test_sd3.images(server, **request)
    ours = test_sd3.images(server, **request, adapters=[{"id": "sd3-style"}])
    theirs = test_sd3.diffusers_reference(sd3.ref.path, [(result.adapter_path, 1.0)], **request)
    assert test_sd3.max_diff(ours, theirs) <= 1
    assert test_sd3.max_diff(ours, plain) > 2, "the trained adapter must change the image"


def test_schnell_and_sd3_without_t5_train(loraswap_home: Path, flow_data: Path, tmp_path: Path) -> None:
    """Flux-schnell (no guidance embedding: none is fed, none in the plan) and an SD3 folder saved
    without T5 (its part is zeros, as the pipeline gives, with a CLIP LoRA training) both train."""
    schnell = tmp_path / "schnell"
    build_tiny_flux_pipeline(schnell=True).save_pretrained(schnell, safe_serialization=True)
    no_t5 = tmp_path / "no-t5"
    build_tiny_sd3_pipeline(sd35=False, t5=False).save_pretrained(no_t5, safe_serialization=True)
    quick = FAST_FLOW | {"steps": 1, "eval_samples": 0, "sample_steps": 1, "export": False}
    for folder, options in ((schnell, {}), (no_t5, {"train_text_encoder": True})):
        config = make_config(
            flow_data, tmp_path / f"run-{folder.name}", base_model=str(folder), **quick, **options
        )
        result = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
        assert result.loop is not None and result.loop.step == 1
        evaluation = result.report["evaluation"] if result.report else {}
        assert evaluation["initial_val_loss"] is not None and evaluation["final_val_loss"] is not None
        assert "train_guidance" not in result.plan["objective"]


def test_flux_trains_from_a_single_file_completed_by_a_components_folder(
    loraswap_home: Path, flow_data: Path, tmp_path: Path
) -> None:
    """`train --base-model flux1-dev.safetensors --base-components FOLDER`: BFL's transformer-only file,
    the rest from a diffusers folder, as `serve` takes them; the run is the folder's run."""
    from safetensors.torch import save_file

    from basemodel.families.flux import single_file as flux_file

    pipe = build_tiny_flux_pipeline()
    folder = tmp_path / "flux-folder"
    pipe.save_pretrained(folder, safe_serialization=True)
    save_file(flux_file.to_single_file(pipe, all_in_one=False), str(tmp_path / "flux1-dev.safetensors"))
    runs = {}
    for name, base in (("file", str(tmp_path / "flux1-dev.safetensors")), ("folder", str(folder))):
        components = folder if name == "file" else None
        config = make_config(
            flow_data, tmp_path / name, **FAST_FLOW, base_model=base, base_components=components, steps=2
        )
        runs[name] = train(config, models_dir=loraswap_home / "models", echo=lambda *_: None)
    file_run, folder_run = (load_file(str(runs[name].adapter_path)) for name in ("file", "folder"))
    assert file_run.keys() == folder_run.keys()  # the same weights and seed: the same trained adapter
    assert all(torch.equal(file_run[key], folder_run[key]) for key in file_run)
    assert runs["file"].report is not None and runs["file"].report["base_model"]["family"] == "flux"
