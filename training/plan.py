"""The training plan: schedule arithmetic, trainable parameters and a memory estimate.

``loraswap train --dry-run`` prints it; a real run writes it to ``OUTPUT/plan.json``. The memory
estimate is weights (in the training dtype) + LoRA parameters, gradients and AdamW moments (fp32)
+ the activations autograd keeps, *measured* by one forward pass at batch size 1 through
``saved_tensors_hooks`` (so gradient checkpointing and the adapter layout are accounted for) and
scaled by the batch size. It is an estimate of tensors, not of allocator overhead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from training.conditioning import Conditioner
from training.data.buckets import Size, crop_geometry
from training.lora import Injection

GIB = 1 << 30


def module_bytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def activation_bytes(
    conditioner: Conditioner,
    size: Size,
    *,
    latent_channels: int,
    vae_factor: int,
    device: torch.device,
    dtype: torch.dtype,
    train_text_encoder: bool,
    autocast: AbstractContextManager[Any],
) -> int:
    """Bytes autograd saves for one training forward at batch size 1 (measured)."""
    unet = conditioner.denoiser
    encoders = list(conditioner.text_encoders.values())
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    latent = torch.zeros(
        1, latent_channels, size[1] // vae_factor, size[0] // vae_factor, device=device, dtype=dtype
    )
    tokens = {name: torch.zeros_like(ids[:1]) for name, ids in conditioner.tokenize([""]).items()}
    added = {k: v[None] for k, v in conditioner.size_conditioning(crop_geometry(*size, size)).items()}
    was = unet.training, [encoder.training for encoder in encoders]
    unet.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            if train_text_encoder:
                for encoder in encoders:
                    encoder.train()
                text = conditioner.encode_text({n: ids.to(device) for n, ids in tokens.items()})
            else:
                with torch.no_grad():
                    text = conditioner.encode_text({n: ids.to(device) for n, ids in tokens.items()})
            text = {key: value.to(dtype) for key, value in text.items()}
            placed = {key: value.to(device, dtype) for key, value in added.items()}
            inputs = conditioner.family.training_inputs(text, placed)
            t = torch.tensor([500], device=device)
            out = conditioner.predict(latent, t, inputs)
            del out
    finally:
        unet.train(was[0])
        for encoder, training in zip(encoders, was[1], strict=True):
            encoder.train(training)
    return total


def schedule(
    num_batches: int, grad_accum: int, steps: int | None, epochs: int | None, default_steps: int
) -> dict[str, Any]:
    per_epoch = max(1, math.ceil(num_batches / grad_accum))
    total = steps if steps is not None else (epochs * per_epoch if epochs is not None else default_steps)
    return {
        "total_steps": total,
        "steps_per_epoch": per_epoch,
        "micro_batches_per_epoch": num_batches,
        "epochs": round(total / per_epoch, 3),
    }


def memory_estimate(
    conditioner: Conditioner,
    injection: Injection,
    sizes: Sequence[Size],
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    train_text_encoder: bool,
    autocast: AbstractContextManager[Any],
) -> dict[str, Any]:
    pipe = conditioner.pipe
    largest = max(sizes, key=lambda s: s[0] * s[1])
    weights = module_bytes(conditioner.denoiser, pipe.vae, *conditioner.all_encoders.values())
    lora = injection.trainable * 4
    optimizer = injection.trainable * 4 * 3  # gradients + two AdamW moments, fp32
    acts = activation_bytes(
        conditioner,
        largest,
        latent_channels=conditioner.family.latent_channels(pipe),
        vae_factor=int(pipe.vae_scale_factor),
        device=device,
        dtype=dtype,
        train_text_encoder=train_text_encoder,
        autocast=autocast,
    )
    total = weights + optimizer + acts * batch_size
    return {
        "weights_bytes": weights,
        "lora_bytes": lora,
        "gradients_and_optimizer_bytes": optimizer,
        "activations_bytes_per_image": acts,
        "activations_at_size": list(largest),
        "total_bytes": total,
        "total_gib": round(total / GIB, 3),
    }


def _objective_line(objective: dict[str, Any]) -> str:
    details = ", ".join(f"{key} {value}" for key, value in objective.items() if key != "kind")
    return f"{objective.get('kind', '?').replace('_', ' ')} ({details})"


def format_plan(plan: dict[str, Any]) -> str:
    """Human-readable plan for ``--dry-run``."""
    mem, lora, base, data, sched = (
        plan["memory"],
        plan["lora"],
        plan["base_model"],
        plan["dataset"],
        plan["schedule"],
    )
    batch, accum = plan["batch_size"], plan["grad_accum"]
    denoiser_key = next(iter(plan["modules"]))
    denoiser = "UNet" if denoiser_key == "unet" else denoiser_key
    sizes = ", ".join("x".join(map(str, s)) for s in plan["sizes"])
    lines = [
        f"base model      {base['name']} ({base['family']}, fingerprint {base['fingerprint'][:16]}...)",
        f"device          {plan['device']}, weights {plan['weight_dtype']}, "
        f"mixed precision {plan['mixed_precision']}",
        f"dataset         {data['train_count']} train / {data['val_count']} validation images, "
        f"{data['skipped_count']} skipped; sizes {sizes}",
        f"schedule        {sched['total_steps']} steps = {sched['epochs']} epochs "
        f"({sched['steps_per_epoch']} steps/epoch), "
        f"batch {batch} x accumulation {accum} = {batch * accum} images/step",
        f"optimizer       AdamW lr {plan['lr']} ({plan['lr_scheduler']}, "
        f"warm-up {plan['lr_warmup_steps']} steps), "
        f"weight decay {plan['weight_decay']}",
        f"objective       {_objective_line(plan.get('objective', {}))}",
        f"LoRA            rank {lora['r']}, alpha {lora['lora_alpha']} (scale {plan['lora_scale']:.4g}), "
        f"init {lora['init_lora_weights']}, rslora {lora['use_rslora']}, dora {lora['use_dora']}",
        f"targets         {denoiser} {', '.join(lora['target_modules'])} -> {plan['modules'][denoiser_key]} "
        "modules",
    ]
    if lora["text_encoder_target_modules"]:
        te_targets = ", ".join(lora["text_encoder_target_modules"])
        counts = dict(list(plan["modules"].items())[1:])  # the denoiser comes first
        if len(counts) == 1:
            lines.append(f"                text encoder {te_targets} -> {sum(counts.values())} modules")
        else:
            each = ", ".join(f"{name} {n}" for name, n in counts.items())
            lines.append(f"                text encoders {te_targets} -> {each} modules")
    acts = mem["activations_bytes_per_image"] / GIB
    lines += [
        f"trainable       {plan['trainable_params']:,} params "
        f"({plan['trainable_percent']:.3f} % of {denoiser} + text encoder)",
        f"memory (est.)   {mem['total_gib']} GiB = weights {mem['weights_bytes'] / GIB:.3f} "
        f"+ grads/AdamW {mem['gradients_and_optimizer_bytes'] / GIB:.3f} "
        f"+ activations {acts:.3f}/image x {batch}",
        f"cadence         validation every {plan['validate_every'] or '-'}, "
        f"samples every {plan['sample_every'] or '-'}, "
        f"checkpoint every {plan['checkpoint_every'] or '-'} steps (and at the end)",
        f"output          {plan['output']}"
        + (f", register as {plan['register']}" if plan.get("register") else ""),
    ]
    return "\n".join(lines)
