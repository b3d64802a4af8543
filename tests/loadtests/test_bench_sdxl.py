"""The sdxl benchmark shape, on tiny-sdxl-random's shape: the random SDXL builder and its fp16 weight
cache, and one whole ``bench_swap`` run through every phase (the code path of ``make bench SHAPE=sdxl``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loadtests.bench_swap.cli import main
from loadtests.bench_swap.sdxl import COMPONENTS, build_sdxl_pipeline, tiny_shape

CPU = torch.device("cpu")


def state(pipe: object, name: str) -> dict[str, torch.Tensor]:
    module = getattr(pipe, name)
    return {k: v.float() for k, v in module.state_dict().items()}


def test_random_sdxl_is_cached_in_fp16_and_read_back_unchanged(tmp_path: Path) -> None:
    shape = tiny_shape()
    first, made = build_sdxl_pipeline(shape, CPU, torch.float32, tmp_path)
    assert made["model_cache_hit"] is False
    folder = Path(made["model_cache"])
    assert folder.parent == tmp_path and folder.name == f"tiny-sdxl-random-{shape.key(0)}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c}.safetensors" for c in COMPONENTS)

    # the cache files are plain safetensors, fp16, holding what the model holds
    unet_file = safetensors.torch.load_file(str(folder / "unet.safetensors"))
    assert {t.dtype for t in unet_file.values()} == {torch.float16}
    assert unet_file.keys() == first.unet.state_dict().keys()
    assert all(torch.equal(unet_file[k].float(), v) for k, v in first.unet.state_dict().items())
    # the UNet runs in fp32; the text encoders' linear layers are stored in fp16 and cast per layer
    assert first.unet.dtype == torch.float32 and first.text_encoder_2.dtype == torch.float32
    stored = {p.dtype for n, p in first.text_encoder_2.named_parameters() if "mlp" in n}
    assert stored == {torch.float16}

    second, made = build_sdxl_pipeline(shape, CPU, torch.float32, tmp_path)
    assert made["model_cache_hit"] is True
    for name in COMPONENTS:
        a, b = state(first, name), state(second, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # the same seed draws the same bytes without a cache; another seed other weights (another key)
    uncached, made = build_sdxl_pipeline(shape, CPU, torch.float32, None)
    assert made["model_cache"] is None
    assert all(torch.equal(v, state(first, "unet")[k]) for k, v in state(uncached, "unet").items())
    other, _ = build_sdxl_pipeline(shape, CPU, torch.float32, None, seed=1)
    assert shape.key(1) != shape.key(0)
    assert not torch.equal(other.unet.conv_in.weight, first.unet.conv_in.weight)


def test_a_cache_file_of_another_model_is_refused(tmp_path: Path) -> None:
    shape = tiny_shape()
    _, made = build_sdxl_pipeline(shape, CPU, torch.float32, tmp_path)
    folder = Path(made["model_cache"])
    vae = folder / "vae.safetensors"
    tensors = safetensors.torch.load_file(str(vae))
    tensors.pop(sorted(tensors)[0])
    safetensors.torch.save_file(tensors, str(vae))
    with pytest.raises(ValueError, match="does not hold this model's tensors"):
        build_sdxl_pipeline(shape, CPU, torch.float32, tmp_path)


@pytest.mark.slow  # every phase of the benchmark on a tiny model: about 40 s on the shared 2 cores
def test_bench_runs_every_phase_on_an_sdxl_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "bench.json"
    phases = ["cold_load", "switch", "unet_step", "request", "mixed", "memory"]  # the SDXL-specific ones
    argv = ["--shape", "tiny-sdxl", "--quick", "--output", str(output), "--model-cache", str(tmp_path / "m")]
    argv += ["--only", "cold,switch,unet_step,request,mixed,memory"]
    assert main(argv) == 0
    document = json.loads(output.read_text())
    meta, results = document["meta"], document["results"]
    assert meta["shape"] == "tiny-sdxl" and meta["text_encoder_2_params"] > 0
    assert (
        meta["model"].startswith("tiny-sdxl-random") and meta["peak_rss_bytes"] >= meta["rss_at_start_bytes"]
    )
    assert list(results) == phases
    assert not [name for name, out in results.items() if "error" in out]
    assert all(out["peak_rss_bytes"] > 0 for out in results.values())
    # diffusers' StableDiffusionXLPipeline loaded the same files: its peft layers and our hooks agree
    step = results["unet_step"]
    assert (
        step["lora_effect_max_abs"] > 0
        and step["ours_vs_diffusers_max_abs"] <= 1e-4 * step["lora_effect_max_abs"]
    )
    assert results["request"]["adapter_changes_image_max_diff"] > 0
    assert results["request"]["no_hooks_image_equals_base"] is True
    assert results["cold_load"]["ratio_load_unload_over_ours"] > 0
    assert [row["resident"] for row in results["switch"]["rows"]] == [1, 3]
    printed = capsys.readouterr().out
    assert "peak RSS" in printed and "request 32 px, 1 steps, CFG: adapter vs base" in printed


def test_text_encoders_left_on_meta_keep_the_architecture(tmp_path: Path) -> None:
    from basemodel.families import detect_pipeline

    shape = tiny_shape()
    full, _ = build_sdxl_pipeline(shape, CPU, torch.float32, tmp_path)
    lean, made = build_sdxl_pipeline(shape, CPU, torch.float32, tmp_path, text_encoders=False)
    assert made["model_cache_hit"] is True and "meta" in made["text_encoders_stored_as"]
    assert lean.text_encoder_2.device.type == "meta" and lean.unet.device.type == "cpu"
    family = detect_pipeline(lean)
    assert family.architecture(lean) == family.architecture(full)  # same LoRA targets, same registry id
