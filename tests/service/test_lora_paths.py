"""The engine's three LoRA paths (none, fused, hooked): exactness, exact restore, safety, the policy.

Engine-level (``sample_batch`` on the shared tiny-sd, fp32 on CPU): the fused path against diffusers'
own ``fuse_lora`` on the same file and against our hooked path, 1,000 fuse/restore cycles over 20
adapters, no hook on a batch without adapters, and a cancelled or failing batch restoring at once.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from adapters.identity import BaseIdentity
from adapters.records import AdapterVersion
from adapters.registry import Registry
from adapters.sources import open_store
from service.engine.sampler import Cancelled, SampleParams, StageTimer, generators_for, sample_batch
from service.engine.schedulers import make_scheduler
from service.lora.fusion import FusedWeights, FuseSet
from service.lora.layers import ConvLoRA, LinearLoRA
from service.lora.model_manager import LoRAModelManager
from service.lora.policy import PathPolicy
from service.lora.request import AppliedAdapter
from service.lora.weights import DeviceAdapter
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case

CPU = torch.device("cpu")
PROMPT, NEGATIVE, SEED = "a red circle", "blurry", 5


@pytest.fixture(scope="module")
def stored(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AdapterVersion, Any]:
    """A peft LoRA (UNet incl. LoCon + text encoder) as a file, its version and canonical tensors."""
    folder = tmp_path_factory.mktemp("lora-paths")
    path = folder / "style.safetensors"
    path.write_bytes(save_bytes(diffusers_layout(make_case(base_model.pipe))))
    registry = Registry(open_store(str(folder / "store")), BaseIdentity.from_base_model(base_model))
    version = registry.register(path, "style")
    return path, version, registry.open(version).tensors


@pytest.fixture
def manager(base_model: Any) -> Iterator[LoRAModelManager]:
    manager = LoRAModelManager(base_model.lora_components)
    yield manager
    manager.remove()
    assert manager.fusion is not None and not manager.fusion.fused


def variant(
    manager: LoRAModelManager, tensors: dict[str, torch.Tensor], factor: float, key: str
) -> DeviceAdapter:
    scaled = {k: (v * factor if ".lora_B." in k else v) for k, v in tensors.items()}
    return DeviceAdapter.build(key, scaled, manager.targets, CPU, torch.float32)


def params(adapters: tuple[AppliedAdapter, ...] = (), seed: int = SEED, steps: int = 4) -> SampleParams:
    return SampleParams(PROMPT, NEGATIVE, steps, 6.0, 32, 32, seed, 1, "ddim", adapters)


def render(base_model: Any, manager: LoRAModelManager, *batch: SampleParams, mode: str = "auto") -> Any:
    manager.policy.mode = mode  # type: ignore[assignment]
    timer = StageTimer()
    images = sample_batch(base_model.pipe, list(batch), timer, lora=manager)
    return [np.asarray(image, dtype=np.int16) for per in images for image in per], timer


def png(base_model: Any, manager: LoRAModelManager, request: SampleParams) -> bytes:
    images = sample_batch(base_model.pipe, [request], StageTimer(), lora=manager)
    buffer = io.BytesIO()
    images[0][0].save(buffer, format="PNG")
    return buffer.getvalue()


def state_sha256(*models: nn.Module) -> str:
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_dense_delta_is_the_hooked_delta_in_weight_space() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(6, 5)
    pair = LinearLoRA.build(linear, torch.randn(3, 6, generator=gen), torch.randn(5, 3, generator=gen))
    x = torch.randn(2, 6, generator=gen)
    merged = nn.functional.linear(x, linear.weight + 0.7 * pair.dense_delta(), linear.bias)
    torch.testing.assert_close(merged, linear(x) + 0.7 * pair.delta(x))
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=1)
    cpair = ConvLoRA.build(
        conv, torch.randn(2, 4, 3, 3, generator=gen), torch.randn(5, 2, 1, 1, generator=gen)
    )
    assert cpair.dense_delta().shape == conv.weight.shape and cpair.dense_delta().dtype == torch.float32
    y = torch.randn(1, 4, 9, 9, generator=gen)
    merged = nn.functional.conv2d(y, conv.weight - 1.5 * cpair.dense_delta(), conv.bias, 2, 1)
    torch.testing.assert_close(merged, conv(y) - 1.5 * cpair.delta(y), atol=1e-5, rtol=1e-5)


def test_a_batch_without_adapters_runs_no_hook(
    base_model: Any, manager: LoRAModelManager, stored: tuple[Path, AdapterVersion, Any]
) -> None:
    _, version, tensors = stored
    applied = (AppliedAdapter(version, variant(manager, tensors, 1.0, "style@1"), 0.8),)
    seen: list[int] = []

    def counter(component: str) -> Any:
        def count_hooks(*_: Any) -> None:  # hooks on the modules of the component about to run
            modules = [m for n, m in manager.targets.items() if n.startswith(f"{component}.")]
            seen.append(sum(len(m._forward_hooks) for m in modules))

        return count_hooks

    unet_check = base_model.pipe.unet.register_forward_pre_hook(counter("unet"))
    text_check = base_model.pipe.text_encoder.register_forward_pre_hook(counter("text_encoder"))
    try:
        _, hooked = render(base_model, manager, params(applied), mode="hooked")
        assert hooked.lora_path == "hooked" and seen and all(n > 0 for n in seen)
        seen.clear()
        _, plain = render(base_model, manager, params())
    finally:
        unet_check.remove()
        text_check.remove()
    assert plain.lora_path == "none"
    assert seen == [0] * len(seen) and len(seen) == 2 + 4  # prompt + negative prompt, 4 UNet steps
    assert manager.hooked_modules == 0


def test_fused_matches_diffusers_fuse_lora_and_our_hooked_path(
    base_model: Any, manager: LoRAModelManager, stored: tuple[Path, AdapterVersion, Any], tiny_model_dir: Path
) -> None:
    path, version, tensors = stored
    applied = (AppliedAdapter(version, variant(manager, tensors, 1.0, "style@1"), 0.7),)
    before = state_sha256(base_model.pipe.unet)
    (hooked,), _ = render(base_model, manager, params(applied), mode="hooked")
    (fused,), timer = render(base_model, manager, params(applied), mode="fused")
    assert timer.lora_path == "fused" and "lora_fuse" in timer.seconds
    assert manager.hooked_modules == sum(n.startswith("text_encoder.") for n in tensors) // 2
    assert state_sha256(base_model.pipe.unet) != before, "the fused weights are in the UNet"
    (plain,), timer = render(base_model, manager, params())
    assert timer.lora_path == "none" and "lora_restore" in timer.seconds
    assert state_sha256(base_model.pipe.unet) == before

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    reference = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=6.0,
        generator=generators_for(SEED, 1),
        output_type="pil",
    ).images[0]
    assert np.abs(fused - np.asarray(reference, dtype=np.int16)).max() <= 1
    assert np.abs(fused - hooked).max() <= 2
    assert np.abs(fused - plain).max() > 10, "the adapter must visibly change the image"


def test_fused_restores_exactly_after_1000_cycles_over_20_adapters(
    base_model: Any, manager: LoRAModelManager, stored: tuple[Path, AdapterVersion, Any]
) -> None:
    _, version, tensors = stored
    pipe = base_model.pipe
    small = params(steps=1)
    baseline = png(base_model, manager, small)
    before = state_sha256(pipe.unet, pipe.text_encoder)
    attention = {k: v for k, v in tensors.items() if ".attn" in k and k.startswith("unet.")}  # kept small
    adapters = [variant(manager, attention, (-1) ** i * (0.2 + 0.1 * i), f"a{i}@1") for i in range(20)]
    fusion = manager.fusion
    assert fusion is not None
    rng = np.random.default_rng(0)
    for cycle in range(1000):
        picked = rng.choice(20, size=1 + cycle % 3, replace=False)
        fuse_set = FuseSet.of([(adapters[i], float(rng.choice([0.5, 1.0, -0.8]))) for i in picked])
        fusion.fuse(fuse_set)
        assert fusion.fused
        if cycle % 2:  # every other cycle restores; the others go straight to the next set
            fusion.restore()
    fusion.restore()
    assert state_sha256(pipe.unet, pipe.text_encoder) == before
    assert png(base_model, manager, small) == baseline
    applied = (AppliedAdapter(version, adapters[3], 1.0),)
    for _ in range(3):  # and through the sampler: fused, then back to the base
        render(base_model, manager, params(applied, steps=1), mode="fused")
        assert png(base_model, manager, small) == baseline
    assert state_sha256(pipe.unet, pipe.text_encoder) == before


def test_a_cancelled_or_failing_batch_leaves_no_fused_weights(
    base_model: Any, manager: LoRAModelManager, stored: tuple[Path, AdapterVersion, Any]
) -> None:
    _, version, tensors = stored
    pipe = base_model.pipe
    before = state_sha256(pipe.unet)
    baseline = png(base_model, manager, params(steps=1))
    applied = (AppliedAdapter(version, variant(manager, tensors, 1.0, "style@1"), 1.0),)
    manager.policy.mode = "fused"
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        sample_batch(pipe, [params(applied)], StageTimer(), lambda: next(calls) >= 2, lora=manager)
    assert manager.fusion is not None and not manager.fusion.fused
    assert state_sha256(pipe.unet) == before

    steps = iter(range(100))

    def fail_on_third_step(*_: Any) -> None:
        if next(steps) == 2:
            raise RuntimeError("the device fell over")

    check = pipe.unet.register_forward_pre_hook(fail_on_third_step)
    try:
        with pytest.raises(RuntimeError, match="fell over"):
            sample_batch(pipe, [params(applied)], StageTimer(), lora=manager)
    finally:
        check.remove()
    assert not manager.fusion.fused
    assert state_sha256(pipe.unet) == before
    assert png(base_model, manager, params(steps=1)) == baseline


def test_a_mixed_batch_after_a_fused_one_runs_hooked_on_the_loaded_weights(
    base_model: Any, manager: LoRAModelManager, stored: tuple[Path, AdapterVersion, Any]
) -> None:
    _, version, tensors = stored
    first = AppliedAdapter(version, variant(manager, tensors, 1.0, "a@1"), 1.0)
    second = AppliedAdapter(version, variant(manager, tensors, -0.6, "b@1"), 1.0)
    mixed = [params((first,), seed=1), params((second,), seed=2), params(seed=3)]
    fresh, timer = render(base_model, manager, *mixed)
    assert timer.lora_path == "hooked"
    (_, _), timer = render(base_model, manager, params((first,), seed=1), params((first,), seed=2))
    assert timer.lora_path == "fused", "a uniform batch of two requests fuses"
    again, timer = render(base_model, manager, *mixed)
    assert timer.lora_path == "hooked" and "lora_restore" in timer.seconds
    for a, b in zip(fresh, again, strict=True):
        assert np.array_equal(a, b)
    same_scale_other_set = [params((first,), seed=1), params((first, second), seed=2)]
    assert render(base_model, manager, *same_scale_other_set)[1].lora_path == "hooked"


def test_the_fuse_budget_and_forced_paths(
    base_model: Any, manager: LoRAModelManager, stored: tuple[Path, AdapterVersion, Any]
) -> None:
    _, version, tensors = stored
    applied = (AppliedAdapter(version, variant(manager, tensors, 1.0, "style@1"), 1.0),)
    fusion = manager.fusion
    assert fusion is not None
    need = fusion.nbytes(FuseSet.of([(applied[0].adapter, 1.0)]))
    assert need == sum(
        manager.targets[n].weight.nbytes for n in applied[0].adapter.modules if n.startswith("unet.")
    )
    budget = fusion.budget_bytes
    try:
        fusion.budget_bytes = need - 1
        assert render(base_model, manager, params(applied, steps=1), mode="fused")[1].lora_path == "hooked"
        fusion.budget_bytes = need
        assert render(base_model, manager, params(applied, steps=1), mode="fused")[1].lora_path == "fused"
        assert fusion.held_bytes == need
        assert render(base_model, manager, params(applied, steps=1), mode="hooked")[1].lora_path == "hooked"
        assert not fusion.fused
    finally:
        fusion.budget_bytes = budget


def test_the_auto_policy_fuses_when_it_pays() -> None:
    policy = PathPolicy()
    shape = (2, 4, 4)
    args: dict[str, Any] = {
        "fits": True,
        "fused_now": False,
        "parked": False,
        "parameters": 1000,
        "steps": 10,
    }
    assert policy.choose(wanted=False, uniform=False, shape=shape, **args).path == "none"
    assert policy.choose(wanted=True, uniform=False, shape=shape, **args).path == "hooked"
    assert policy.choose(wanted=True, uniform=True, shape=shape, **{**args, "fits": False}).path == "hooked"
    assert policy.choose(wanted=True, uniform=True, shape=shape, **args).reason == "unmeasured"
    policy.observe_fuse(0.5, 1000)  # 0.5 s to fuse
    policy.observe_restore(0.1)
    policy.observe_step("hooked", shape, 0.05)
    policy.observe_step("none", shape, 0.03)  # hooks cost 0.02 s a step: 10 steps save 0.2 s < 0.6 s
    assert policy.choose(wanted=True, uniform=True, shape=shape, **args).path == "hooked"
    assert policy.choose(wanted=True, uniform=True, shape=shape, **{**args, "steps": 40}).path == "fused"
    assert (
        policy.choose(wanted=True, uniform=True, shape=shape, **{**args, "fused_now": True}).path == "fused"
    )
    assert policy.choose(wanted=True, uniform=True, shape=shape, **{**args, "parked": True}).path == "fused"
    policy.mode = "hooked"
    assert (
        policy.choose(wanted=True, uniform=True, shape=shape, **{**args, "fused_now": True}).path == "hooked"
    )


def test_one_fused_state_per_model(base_model: Any, manager: LoRAModelManager) -> None:
    other = LoRAModelManager(base_model.lora_components)
    assert other.fusion is manager.fusion
    assert FusedWeights.for_model(base_model.pipe.unet, manager.targets, "unet.", 1).budget_bytes == 1
