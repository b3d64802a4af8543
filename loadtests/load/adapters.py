"""The adapters under load: tiny-sd LoRA files, built without a trainer, registered over HTTP.

The files are the hot-swap benchmark's (``loadtests.bench_swap.fixtures``): PEFT's LoRA layout for
tiny-sd's UNet attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), rank 4, values drawn seeded from
the distribution ``init_lora_weights=False`` leaves, saved as fp16 safetensors (about 100 KiB each; about
170 KiB each once resident on the device in fp32).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from basemodel.tiny import TINY_NAME
from loadtests.bench_swap.fixtures import peft_layout, write_adapter_files

RANK = 4
ID_PREFIX = "load"


def adapter_id(index: int) -> str:
    return f"{ID_PREFIX}-{index:02d}"


def write_adapters(models_dir: Path, count: int, folder: Path) -> list[Path]:
    """``count`` distinct adapter files for the installed tiny-sd (its UNet built on the meta device)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(models_dir / TINY_NAME / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return write_adapter_files(peft_layout(unet, RANK), count, torch.float16, folder)


def register_adapters(url: str, files: list[Path]) -> list[str]:
    """``POST /v1/adapters`` (multipart) for each file as ``load-NN``; the ids, most popular first."""
    ids = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for index, path in enumerate(files):
            ids.append(adapter_id(index))
            response = http.post(
                "/v1/adapters",
                files={"file": (path.name, path.read_bytes(), "application/octet-stream")},
                data={"id": ids[-1]},
            )
            if response.status_code not in (200, 201):
                raise RuntimeError(f"registering {path.name}: {response.status_code} {response.text[:300]}")
    return ids
