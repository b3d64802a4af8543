"""What every phase works on: the pipeline, the adapter files, the registry and the shared ``Bench`` state."""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from adapters.identity import BaseIdentity
from adapters.records import AdapterVersion, blob_key
from adapters.registry import Registry
from adapters.sources import LocalStore
from basemodel.families import detect_pipeline
from service.engine.sampler import SampleParams
from service.lora.cache import AdapterCache, Budgets
from service.lora.model_manager import LoRAModelManager
from service.lora.request import AppliedAdapter
from service.lora.weights import DeviceAdapter
from service.metrics import Metrics

from .config import FLOW_SCHEDULER, GUIDANCE, LORA_TARGETS, MIB, MODEL_CACHE, PROMPT, SCHEDULER, Sizes
from .machine import loadavg, log, peak_rss_bytes, release_memory, rss_bytes
from .mmdit import SHAPES as MMDIT_SHAPES
from .mmdit import build_mmdit_pipeline
from .sdxl import SHAPES as SDXL_SHAPES
from .sdxl import build_sdxl_pipeline

UNBOUNDED = 1 << 40  # a cache budget nothing in the benchmark reaches
FILE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# -- the model and the adapter files -----------------------------------------------------------------


def build_pipeline(
    shape: str,
    device: torch.device,
    dtype: torch.dtype,
    model_cache: Path | None = MODEL_CACHE,
    prompts: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """The shape's pipeline on ``device`` in ``dtype``, and how it was made (for the JSON). The SDXL
    shapes keep their random weights under ``model_cache`` (None: drawn every time, not kept) and, when
    no phase encodes a prompt (``prompts`` False), leave their text encoders without weights."""
    if shape in SDXL_SHAPES:
        return build_sdxl_pipeline(SDXL_SHAPES[shape](), device, dtype, model_cache, text_encoders=prompts)
    if shape in MMDIT_SHAPES:
        return build_mmdit_pipeline(MMDIT_SHAPES[shape](), device, dtype, model_cache, text_encoders=prompts)
    pipe = build_sd_pipeline(shape)
    pipe.to(device=device, dtype=dtype)
    return pipe, {}


def build_sd_pipeline(shape: str) -> Any:
    """tiny-sd, or an SD1.5-shaped random-init pipeline from the shipped configs (nothing downloaded)."""
    if shape == "tiny":
        from basemodel.tiny import build_tiny_pipeline

        return build_tiny_pipeline()
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from basemodel.single_file import SD15_CONFIG_DIR, build_clip_tokenizer
    from basemodel.tiny import assemble_pipeline

    def config(name: str) -> dict[str, Any]:
        return dict(json.loads((SD15_CONFIG_DIR / name / "config.json").read_text()))

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config("unet"))
    vae = AutoencoderKL.from_config(config("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
    scheduler_config = json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return assemble_pipeline(vae, text_encoder, build_clip_tokenizer(), unet, scheduler=scheduler)


def lora_targets(denoiser: torch.nn.Module) -> str | list[str]:
    """PEFT ``target_modules`` for the denoiser's class (``config.LORA_TARGETS``)."""
    return LORA_TARGETS[type(denoiser).__name__]


def peft_layout(denoiser: torch.nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """PEFT's LoRA keys and shapes for ``denoiser`` (injected into a weightless meta-device copy)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        skeleton = type(denoiser).from_config(denoiser.config)  # type: ignore[attr-defined]
    targets = lora_targets(denoiser)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, skeleton)
    return {key: tuple(t.shape) for key, t in get_peft_model_state_dict(skeleton).items()}


def write_adapter_files(
    layout: dict[str, tuple[int, ...]], count: int, dtype: torch.dtype, folder: Path, prefix: str = "unet"
) -> list[Path]:
    """``count`` adapters with distinct seeded values; nn.Linear's default init as peft leaves it; keys
    under ``prefix`` (the denoiser's component name)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1234)
    files = []
    for index in range(count):
        tensors = {}
        for key, shape in layout.items():
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform(a=√5) of nn.Linear(in=shape[1])
            values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            tensors[f"{prefix}.{key}"] = values.to(dtype).contiguous()
        path = folder / f"lora_{index:02d}.safetensors"
        safetensors.torch.save_file(tensors, str(path))
        files.append(path)
    return files


# -- shared state ------------------------------------------------------------------------------------


@dataclass
class Bench:
    shape: str
    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    pipe: Any
    manager: LoRAModelManager
    registry: Registry
    versions: list[AdapterVersion]
    files: list[Path]
    workdir: Path
    denoiser: str = "unet"  # the pipeline attribute holding the denoiser
    scheduler: str = SCHEDULER
    guidance: float = GUIDANCE
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> LocalStore:
        store = self.registry.store
        assert isinstance(store, LocalStore)
        return store

    def blob(self, version: AdapterVersion) -> Path:
        return self.store.root / blob_key(version.sha256)

    def new_cache(self, device_bytes: int, host_bytes: int) -> tuple[AdapterCache, Metrics]:
        metrics = Metrics()
        cache = AdapterCache(
            self.registry,
            self.manager.targets,
            self.device,
            self.dtype,
            Budgets(device_bytes=device_bytes, host_bytes=host_bytes, disk_bytes=UNBOUNDED),
            self.workdir / "disk-cache",
            metrics,
        )
        return cache, metrics

    def unbounded_cache(self) -> AdapterCache:
        """A cache whose device and host tiers hold every adapter."""
        return self.new_cache(device_bytes=UNBOUNDED, host_bytes=UNBOUNDED)[0]

    def device_only_cache(self) -> AdapterCache:
        """A cache whose device tier holds every adapter and whose host tier keeps only the last one
        (the file's tensors are not kept beside the ready-to-run copy: an SDXL rank-16 adapter is 46 MB
        of fp16 tensors and 93 MB ready to run in fp32)."""
        return self.new_cache(device_bytes=UNBOUNDED, host_bytes=0)[0]

    def params(
        self, px: int, steps: int, seed: int = 0, adapters: tuple[AppliedAdapter, ...] = ()
    ) -> SampleParams:
        return SampleParams(PROMPT, "", steps, self.guidance, px, px, seed, 1, self.scheduler, adapters)

    def applied(self, index: int, adapter: DeviceAdapter) -> AppliedAdapter:
        return AppliedAdapter(self.versions[index], adapter, 1.0)

    def reinstall_hooks(self) -> None:
        self.manager = new_manager(self.pipe, self.sizes)


def build_bench(
    shape: str,
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    workdir: Path,
    model_cache: Path | None = MODEL_CACHE,
    prompts: bool = True,
) -> tuple[Bench, dict[str, Any]]:
    """The pipeline on ``device``, the adapter files, registered in a local store; and what they are."""
    log(f"building {shape} on {device} ({str(dtype).removeprefix('torch.')})")
    pipe, made = build_pipeline(shape, device, dtype, model_cache, prompts)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them (built models start in training mode)
    family = detect_pipeline(pipe)
    identity = BaseIdentity(
        name=f"bench-{shape}",
        fingerprint=hashlib.sha256(f"bench-swap/{shape}/seed0".encode()).hexdigest(),
        architecture=family.architecture(pipe),
    )
    log(f"writing {sizes.adapters} rank-{sizes.rank} adapter files ({sizes.file_dtype})")
    denoiser = family.denoiser_module(pipe)
    layout = peft_layout(denoiser, sizes.rank)
    file_dtype = FILE_DTYPES[sizes.file_dtype]
    files = write_adapter_files(layout, sizes.adapters, file_dtype, workdir / "files", family.denoiser)
    registry = Registry(LocalStore(workdir / "store"), identity, max_rank=max(64, sizes.rank))
    versions = [registry.register(path, f"bench-{i:02d}") for i, path in enumerate(files)]
    manager = new_manager(pipe, sizes)
    flow = family.flow_matching
    bench = Bench(
        shape,
        sizes,
        device,
        dtype,
        pipe,
        manager,
        registry,
        versions,
        files,
        workdir,
        denoiser=family.denoiser,
        scheduler=FLOW_SCHEDULER if flow else SCHEDULER,
        guidance=family.default_guidance if flow else GUIDANCE,
    )
    denoiser_params = sum(p.numel() for p in denoiser.parameters())
    described = {
        **made,
        "denoiser": family.denoiser,
        "denoiser_params": denoiser_params,
        f"{family.denoiser}_params": denoiser_params,
        **{
            f"{name}_params": sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in family.text_encoders
        },
        "lora_modules": len(layout) // 2,
        "lora_rank": sizes.rank,
        "lora_targets": lora_targets(denoiser),
        "adapter_file_bytes": files[0].stat().st_size,
        "adapter_file_dtype": sizes.file_dtype,
        "hooked_modules": len(manager.targets),
    }
    return bench, described


def new_manager(pipe: Any, sizes: Sizes) -> LoRAModelManager:
    """Hooks on the pipeline's LoRA components, with the shape's fuse budget."""
    components = detect_pipeline(pipe).lora_components(pipe)
    return LoRAModelManager(components, fuse_budget_bytes=sizes.fuse_budget_mb * MIB)


# -- what the phases share ---------------------------------------------------------------------------


@contextmanager
def phase(bench: Bench, name: str) -> Iterator[dict[str, Any]]:
    """Collects one phase's results into ``bench.results[name]``; a failure is recorded, not raised."""
    out: dict[str, Any] = {"load_average_start": loadavg()}
    log(f"{name} …")
    started = time.perf_counter()
    try:
        yield out
    except Exception as exc:  # record it and go on with the other phases
        out["error"] = "".join(traceback.format_exception(exc))
        log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        with suppress(Exception):
            bench.pipe.unload_lora_weights()
    finally:
        out["wall_s"] = round(time.perf_counter() - started, 2)
        out["load_average_end"] = loadavg()
        release_memory()  # what the phase freed goes back to the OS before the next one
        out["rss_end_bytes"], out["peak_rss_bytes"] = rss_bytes(), peak_rss_bytes()
        bench.results[name] = out
        log(f"{name} done in {out['wall_s']} s")


def assert_no_peft_layers(bench: Bench) -> None:
    """After diffusers' unload, the denoiser holds its original modules (the ones our hooks sit on)."""
    prefix = f"{bench.denoiser}."
    modules = dict(getattr(bench.pipe, bench.denoiser).named_modules())
    for name, module in bench.manager.targets.items():
        if name.startswith(prefix):
            assert modules.get(name[len(prefix) :]) is module, f"{name} was replaced"
    assert not any("lora_" in name for name in modules), f"peft layers left in the {bench.denoiser}"


def random_unet_kwargs(
    bench: Bench, batch: int, px: int, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """What a direct UNet call takes besides latents and timestep, drawn at random: 77 tokens of the
    UNet's cross-attention width and, for a UNet with ``text_time`` added conditioning (SDXL), pooled
    text embeddings and the time ids of a ``px`` × ``px`` image (crop 0, 0)."""
    config = bench.pipe.unet.config
    hidden = torch.randn(batch, 77, int(config.cross_attention_dim), generator=generator)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden.to(bench.device, bench.dtype)}
    if config.get("addition_embed_type") == "text_time":
        width = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
        pooled = torch.randn(batch, width, generator=generator)
        time_ids = torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": pooled.to(bench.device, bench.dtype),
            "time_ids": time_ids.to(bench.device, bench.dtype),
        }
    return kwargs


def images_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Largest per-pixel difference (0…255) between two lists of PIL images."""
    return float(
        max(
            np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()
            for x, y in zip(a, b, strict=True)
        )
    )
