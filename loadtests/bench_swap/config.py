"""What the benchmark runs with: model/request constants and the sizes (repeats, resolutions) per shape."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"  # loadtests/results
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# The MMDiT transformers: every attention and MLP Linear of every block (the targets of diffusers'
# train_dreambooth_lora_flux.py / _sd3.py with all layers; SD3.5's second attention ``attn2``; Flux's
# single blocks: q, k, v, ``proj_mlp`` and ``proj_out``, their fused attention-out + MLP-out), as a
# PEFT regex: never the embedders, the adaLN modulations or the final ``proj_out``.
_ATTENTION = r"attn2?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
_MLP = r"ff(_context)?\.net\.(0\.proj|2)"
_FLUX_SINGLE = r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
LORA_TARGETS: dict[str, str | list[str]] = {
    "UNet2DConditionModel": TARGET_MODULES,
    "SD3Transformer2DModel": rf".*\.({_ATTENTION}|{_MLP})",
    "FluxTransformer2DModel": rf".*\.({_ATTENTION}|{_MLP})|{_FLUX_SINGLE}",
}
PROMPT = "a red circle on a blue background"
SCHEDULER = "ddim"  # UNet families; flow-matching families run "euler" (FlowMatchEuler)
FLOW_SCHEDULER = "euler"
GUIDANCE = 7.5  # UNet families; the others their family's default_guidance
MIB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    rank: int
    adapters: int  # adapter files generated (and registered)
    resident: tuple[int, ...]  # resident counts for the switch table
    cold_repeats: int
    hotswap_repeats: int
    set_adapters_calls: int  # diffusers set_adapters calls per resident count
    switch_loops: int  # our activate/leave pairs per timing sample
    switch_samples: int
    acquire_loops: int  # acquire + activate + release per timing sample
    request_px: int
    request_steps: int
    request_repeats: int
    forward_repeats: int  # rounds of base / ours / diffusers UNet forwards
    no_hooks: bool  # also run the base request with our hooks removed (idle-hook cost)
    mixed_requests: int
    mixed_px: int
    mixed_steps: int
    mixed_repeats: int
    mem_adapters: int
    mem_device_slots: int
    mem_swaps: int
    mem_forward: bool  # one UNet forward (batch 1) inside every swap
    mem_forward_px: int
    file_dtype: str = "fp16"
    warmup: int = 1
    request_path: str = "auto"  # the request phase's LoRA path policy: auto, fused or hooked
    # the manager's fuse budget (LORASWAP_LORA_FUSE_BUDGET_MB; the server's default 256 MiB holds SD1.5's
    # attention projections): the fused path needs every targeted weight's size in the run dtype
    fuse_budget_mb: int = 256


SIZES: dict[tuple[str, bool], Sizes] = {
    ("tiny", False): Sizes(
        rank=4,
        adapters=64,
        resident=(1, 4, 16, 64),
        cold_repeats=15,
        hotswap_repeats=15,
        set_adapters_calls=20,
        switch_loops=20000,
        switch_samples=15,
        acquire_loops=3000,
        request_px=64,
        request_steps=20,
        request_repeats=5,
        forward_repeats=10,
        no_hooks=True,
        mixed_requests=8,
        mixed_px=64,
        mixed_steps=20,
        mixed_repeats=3,
        mem_adapters=50,
        mem_device_slots=8,
        mem_swaps=2000,
        mem_forward=True,
        mem_forward_px=16,
    ),
    ("tiny", True): Sizes(
        rank=4,
        adapters=16,
        resident=(1, 4, 16),
        cold_repeats=3,
        hotswap_repeats=3,
        set_adapters_calls=5,
        switch_loops=500,
        switch_samples=3,
        acquire_loops=100,
        request_px=64,
        request_steps=4,
        request_repeats=2,
        forward_repeats=2,
        no_hooks=True,
        mixed_requests=8,
        mixed_px=64,
        mixed_steps=4,
        mixed_repeats=1,
        mem_adapters=16,
        mem_device_slots=4,
        mem_swaps=200,
        mem_forward=True,
        mem_forward_px=16,
    ),
    ("sd15", False): Sizes(
        rank=16,
        adapters=64,
        resident=(1, 4, 16, 64),
        cold_repeats=7,
        hotswap_repeats=5,
        set_adapters_calls=7,
        switch_loops=20000,
        switch_samples=15,
        acquire_loops=2000,
        request_px=128,
        request_steps=4,
        request_repeats=3,
        forward_repeats=4,
        no_hooks=False,
        mixed_requests=8,
        mixed_px=128,
        mixed_steps=2,
        mixed_repeats=1,
        mem_adapters=50,
        mem_device_slots=8,
        mem_swaps=2000,
        mem_forward=False,
        mem_forward_px=64,
    ),
    ("sd15", True): Sizes(
        rank=16,
        adapters=4,
        resident=(1, 4),
        cold_repeats=2,
        hotswap_repeats=1,
        set_adapters_calls=2,
        switch_loops=200,
        switch_samples=2,
        acquire_loops=20,
        request_px=64,
        request_steps=1,
        request_repeats=1,
        forward_repeats=1,
        no_hooks=False,
        mixed_requests=4,
        mixed_px=64,
        mixed_steps=1,
        mixed_repeats=1,
        mem_adapters=4,
        mem_device_slots=2,
        mem_swaps=40,
        mem_forward=False,
        mem_forward_px=64,
    ),
    # SDXL-shaped (loadtests/bench_swap/sdxl.py): the UNet alone is 9.6 GiB in fp32 and one CFG UNet
    # forward takes 53 s at 128 px and 80-100 s at 256 px on one thread of the shared 2-core machine, so
    # the CPU request rows run 128 px, 2 steps (the "small size").
    ("sdxl", False): Sizes(
        rank=16,
        adapters=64,
        resident=(1, 4, 16, 64),
        cold_repeats=3,
        hotswap_repeats=2,
        set_adapters_calls=3,
        switch_loops=20000,
        switch_samples=8,
        acquire_loops=2000,
        request_px=128,
        request_steps=2,
        request_repeats=2,
        forward_repeats=1,
        no_hooks=False,
        mixed_requests=4,
        mixed_px=128,
        mixed_steps=1,
        mixed_repeats=1,
        mem_adapters=50,
        mem_device_slots=8,
        mem_swaps=500,
        mem_forward=False,
        mem_forward_px=64,
    ),
    ("sdxl", True): Sizes(
        rank=16,
        adapters=4,
        resident=(1, 4),
        cold_repeats=2,
        hotswap_repeats=1,
        set_adapters_calls=2,
        switch_loops=200,
        switch_samples=2,
        acquire_loops=20,
        request_px=64,
        request_steps=1,
        request_repeats=3,
        forward_repeats=1,
        no_hooks=False,
        mixed_requests=2,
        mixed_px=64,
        mixed_steps=1,
        mixed_repeats=1,
        mem_adapters=4,
        mem_device_slots=2,
        mem_swaps=40,
        mem_forward=False,
        mem_forward_px=64,
    ),
    # tiny-sdxl-random's shape through the sdxl code path, for the tests (seconds)
    ("tiny-sdxl", True): Sizes(
        rank=4,
        adapters=3,
        resident=(1, 3),
        cold_repeats=1,
        hotswap_repeats=1,
        set_adapters_calls=1,
        switch_loops=50,
        switch_samples=2,
        acquire_loops=10,
        request_px=32,
        request_steps=1,
        request_repeats=1,
        forward_repeats=1,
        no_hooks=True,
        mixed_requests=2,
        mixed_px=32,
        mixed_steps=1,
        mixed_repeats=1,
        mem_adapters=3,
        mem_device_slots=2,
        mem_swaps=10,
        mem_forward=True,
        mem_forward_px=32,
    ),
}
SIZES[("tiny-sdxl", False)] = SIZES[("tiny-sdxl", True)]

# The MMDiT shapes (loadtests/bench_swap/mmdit.py) run cold, switch and request by default (cli
# DEFAULT_PHASES). The Flux-shaped transformer (2 double + 4 single blocks, 1.3 B parameters) is 5 GiB
# in fp32 and attends over 512 T5 tokens + the image's, so one step at 128 px takes about half a minute
# on one thread of the shared 2-core machine: the CPU request rows run 128 px, 1 step, on the fused path.
_MMDIT = replace(
    SIZES[("sdxl", False)],  # the sdxl shape's sizes, but one step per request, four requests per side
    request_steps=1,
    request_repeats=4,  # two rounds once read as a 0.64× fused request (machine noise)
    request_path="fused",
    # Flux-shaped: the 44 targeted Linears hold 906 M weights (3.4 GiB fp32); SD3.5 medium's 337: 1.46 B
    fuse_budget_mb=16 * 1024,
)
_TINY_MMDIT = replace(SIZES[("tiny-sdxl", True)], no_hooks=False, mem_forward=False, request_path="fused")
for _shape in ("flux", "sd3"):
    SIZES[(_shape, False)] = _MMDIT
    SIZES[(_shape, True)] = replace(
        _MMDIT,
        adapters=4,
        resident=(1, 4),
        cold_repeats=2,
        hotswap_repeats=1,
        set_adapters_calls=2,
        switch_loops=200,
        switch_samples=2,
        acquire_loops=20,
        request_px=64,
        request_repeats=1,
    )
for _shape in ("tiny-flux", "tiny-sd3"):
    SIZES[(_shape, False)] = SIZES[(_shape, True)] = _TINY_MMDIT
SHAPES = tuple(dict.fromkeys(shape for shape, _quick in SIZES))

# Where the sdxl shapes keep their random weights (fp16, keyed by configs and seed; git-ignored).
MODEL_CACHE = RESULTS_DIR / "models"

# On CUDA the UNet shapes run fp16; the MMDiT shapes bf16, as diffusers runs Flux and SD3.5.
CUDA_DTYPES = {
    "flux": torch.bfloat16,
    "sd3": torch.bfloat16,
    "tiny-flux": torch.bfloat16,
    "tiny-sd3": torch.bfloat16,
}

# On CUDA the whole sd15 run is cheap: use SD1.5's real 512 px and 20 steps for the request numbers.
CUDA_OVERRIDES: dict[str, dict[str, Any]] = {
    "sd15": {
        "request_px": 512,
        "request_steps": 20,
        "request_repeats": 5,
        "forward_repeats": 10,
        "no_hooks": True,
        "mixed_px": 512,
        "mixed_steps": 20,
        "mixed_repeats": 3,
        "mem_forward": True,
        "mem_forward_px": 512,
    },
    # SDXL's own 1024 px, 30 steps for the request rows (not run yet: no GPU was available)
    "sdxl": {
        "request_px": 1024,
        "request_steps": 30,
        "request_repeats": 5,
        "forward_repeats": 10,
        "no_hooks": True,
        "mixed_px": 1024,
        "mixed_steps": 30,
        "mixed_repeats": 3,
        "mixed_requests": 8,
        "mem_forward": True,
        "mem_forward_px": 1024,
    },
}
