"""The MMDiT benchmark shapes (``make bench SHAPE=flux|sd3``) and ``make bench-gpu --dry``: the random
Flux/SD3 builders from shipped configs, their LoRA targets, and the one-command GPU run rehearsed on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loadtests import bench_gpu
from loadtests.bench_swap.fixtures import peft_layout
from loadtests.bench_swap.mmdit import (
    FLUX_BLOCKS,
    build_mmdit_pipeline,
    flux_shape,
    sd3_shape,
    skeleton,
    tiny_sd3_shape,
)

CPU = torch.device("cpu")


def test_flux_shape_is_flux_dev_wide_with_fewer_blocks_and_every_attention_and_mlp_linear_targeted() -> None:
    shape = flux_shape()
    config = shape.configs["transformer"]
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (24, 128)  # 3072 wide
    assert (config["joint_attention_dim"], config["pooled_projection_dim"], config["in_channels"]) == (
        4096,
        768,
        64,
    )
    assert {k: config[k] for k in FLUX_BLOCKS} == {"num_layers": 2, "num_single_layers": 4}
    transformer = skeleton(shape.classes["transformer"], config)  # meta: no storage
    layout = peft_layout(transformer, rank=16)
    modules = {key.rsplit(".lora_", 1)[0] for key in layout}
    # per double block: 8 attention projections (image and text stream) + 2 × 2 MLP linears;
    # per single block: q, k, v, proj_mlp, proj_out — never the embedders, norms or the final proj_out
    assert len(modules) == 2 * 12 + 4 * 5
    assert "single_transformer_blocks.3.proj_out" in modules and "proj_out" not in modules
    assert "transformer_blocks.1.ff_context.net.2" in modules
    assert not [m for m in modules if "norm" in m or "embed" in m]
    assert layout["transformer_blocks.0.ff.net.0.proj.lora_A.weight"] == (16, 3072)
    assert layout["transformer_blocks.0.ff.net.0.proj.lora_B.weight"] == (12288, 16)


def test_sd3_shape_is_sd35_medium() -> None:
    shape = sd3_shape()
    config = shape.configs["transformer"]
    assert config["num_layers"] == 24 and list(config["dual_attention_layers"]) == list(range(13))
    assert (config["num_attention_heads"] * config["attention_head_dim"], config["qk_norm"]) == (
        1536,
        "rms_norm",
    )
    assert (config["joint_attention_dim"], config["pooled_projection_dim"]) == (4096, 2048)
    transformer = skeleton(shape.classes["transformer"], config)
    params = sum(p.numel() for p in transformer.parameters())
    assert 2.2e9 < params < 2.6e9
    modules = {key.rsplit(".lora_", 1)[0] for key in peft_layout(transformer, rank=16)}
    assert "transformer_blocks.12.attn2.to_q" in modules and "transformer_blocks.13.attn2.to_q" not in modules


def test_random_sd3_is_cached_and_read_back_with_its_position_table(tmp_path: Path) -> None:
    shape = tiny_sd3_shape()
    first, made = build_mmdit_pipeline(shape, CPU, torch.float32, tmp_path)
    second, again = build_mmdit_pipeline(shape, CPU, torch.float32, tmp_path)
    assert made["model_cache_hit"] is False and again["model_cache_hit"] is True
    a, b = first.transformer.state_dict(), second.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the fixed sin-cos table, not uninitialised memory
    table = first.transformer.pos_embed.pos_embed
    assert torch.isfinite(table).all() and float(table.abs().max()) <= 1.0 and float(table.std()) > 0.1
    # the text encoders stored in fp16 except T5's wo (kept fp32, as transformers keeps it)
    t5 = second.text_encoder_3
    assert {p.dtype for n, p in t5.named_parameters() if n.endswith("DenseReluDense.wo.weight")} == {
        torch.float32
    }
    assert {p.dtype for n, p in t5.named_parameters() if n.endswith("DenseReluDense.wi_0.weight")} == {
        torch.float16
    }


@pytest.mark.slow  # four tiny shapes through cold, switch and request: 50 s on the shared 2 cores (load 5)
def test_bench_gpu_dry_runs_every_shape_and_writes_json_and_markdown(tmp_path: Path) -> None:
    assert bench_gpu.main(["--dry", "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert [run["shape"] for run in summary["shapes"]] == ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"]
    assert all(run["status"] == "ok" for run in summary["shapes"])
    for run in summary["shapes"]:
        document = json.loads((tmp_path / run["json"]).read_text())
        assert list(document["results"]) == ["cold_load", "switch", "request"]
        assert document["results"]["cold_load"]["ratio_load_unload_over_ours"] > 0
    flux = json.loads((tmp_path / "bench_swap-tiny-flux-cpu.json").read_text())
    assert flux["meta"]["denoiser"] == "transformer" and flux["meta"]["lora_modules"] == 17
    assert flux["results"]["request"]["paths_taken"]["adapter"] == "fused"
    assert flux["results"]["request"]["scheduler"] == "euler"
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "## tiny-flux: ok" in table and "fused path (fused): adapter vs base" in table


def test_bench_gpu_refuses_to_run_without_cuda_unless_dry(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_gpu.main([]) == 2
    assert "--dry" in capsys.readouterr().err


def test_bench_gpu_plan_fits_nine_minutes_and_covers_every_shape() -> None:
    assert [step.shape for step in bench_gpu.PLAN] == ["sd15", "sdxl", "sd3", "flux"]
    assert sum(step.expected_s for step in bench_gpu.PLAN) <= bench_gpu.BUDGET_S == 540
