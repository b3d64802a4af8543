"""One CFG-shaped UNet forward: base, the adapter through our hooks, and through diffusers' peft layers."""

from __future__ import annotations

from functools import partial

import torch

from service.lora.model_manager import ActiveLoRA
from service.lora.weights import DeviceAdapter

from .fixtures import Bench, assert_no_peft_layers, phase, random_unet_kwargs
from .machine import log
from .timing import Variant, medians, paired, rotated, rounds, timed

BATCH = 2  # classifier-free guidance: the conditional and the unconditional half


def bench_unet_step(bench: Bench) -> None:
    """One CFG-shaped UNet forward (batch 2): base, our hooks, diffusers' peft layers, same file.

    Checks that ours and diffusers compute the same thing, and times the LoRA cost per denoising step
    for both (diffusers' adapter is loaded before and unloaded after its timed forward).
    """
    s = bench.sizes
    with phase(bench, "unet_step") as out:
        cache = bench.unbounded_cache()
        adapter = cache.load_blocking(bench.versions[0])
        outputs: dict[str, torch.Tensor] = {}
        variants = step_variants(bench, adapter, outputs)
        # the warm-up round also leaves the outputs compared below
        samples = rounds(variants, s.forward_repeats, order=rotated, warmup=1)
        cache.close()
        assert_no_peft_layers(bench)
        effect = float((outputs["diffusers"] - outputs["base"]).abs().max())
        diff = float((outputs["ours"] - outputs["diffusers"]).abs().max())
        out.update(
            px=s.request_px,
            batch=BATCH,
            median_s=medians(samples),
            samples_s=samples,
            ratio_ours_over_base=paired(samples["ours"], samples["base"]),
            ratio_diffusers_over_base=paired(samples["diffusers"], samples["base"]),
            lora_effect_max_abs=effect,
            ours_vs_diffusers_max_abs=diff,
            relative=diff / effect if effect else None,
        )
        log(f"  ours vs diffusers: max |Δ| {diff:.3g} (LoRA effect {effect:.3g})")


def step_variants(
    bench: Bench, adapter: DeviceAdapter, outputs: dict[str, torch.Tensor]
) -> list[Variant[str]]:
    """Timed forwards ``base``, ``ours`` and ``diffusers``; each leaves its output in ``outputs``."""
    pipe, device = bench.pipe, bench.device
    latent = bench.sizes.request_px // int(pipe.vae_scale_factor)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, 4, latent, latent, generator=generator).to(device, bench.dtype)
    conditioning = random_unet_kwargs(bench, BATCH, bench.sizes.request_px, generator)

    @torch.no_grad()
    def forward(label: str) -> None:
        result = pipe.unet(x, 500, **conditioning, return_dict=False)[0]
        outputs[label] = torch.as_tensor(result).float()

    def base() -> float:
        return timed(partial(forward, "base"), device)

    def ours() -> float:
        with bench.manager.activate([ActiveLoRA(adapter, 1.0)]):
            return timed(partial(forward, "ours"), device)

    def diffusers() -> float:
        pipe.load_lora_weights(str(bench.files[0]), adapter_name="step")
        try:
            return timed(partial(forward, "diffusers"), device)
        finally:
            pipe.unload_lora_weights()

    return [("base", base), ("ours", ours), ("diffusers", diffusers)]
