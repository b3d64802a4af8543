"""Warm switches between resident adapters: ``activate`` costs the same whichever adapter came before.

A switch between two adapters on the same modules must be as cheap as re-entering the same adapter
(the benchmark's flat-from-1-to-64-resident row, issue 19): the hooks stay, and the module-name sets
of both adapters end up as one object, so the check that nothing needs re-hooking is an identity test
rather than a comparison of every module name.
"""

from __future__ import annotations

import torch
from torch import nn

from service.lora.layers import LinearLoRA
from service.lora.model_manager import ActiveLoRA, LoRAModelManager
from service.lora.weights import DeviceAdapter

MODULES = 12


def adapter(layers: list[nn.Linear], key: str, seed: int) -> DeviceAdapter:
    """A rank-2 LoRA on every Linear (component ``net``)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {
        f"net.{i}": LinearLoRA.build(
            layer, torch.randn(2, 4, generator=gen), torch.randn(4, 2, generator=gen)
        )
        for i, layer in enumerate(layers)
    }
    return DeviceAdapter(key, dict(modules))


def test_switching_between_adapters_on_the_same_modules_keeps_one_hooked_set() -> None:
    layers = [nn.Linear(4, 4) for _ in range(MODULES)]
    model = nn.Sequential(*layers)
    manager = LoRAModelManager({"net": model})
    a, b = adapter(layers, "a", 1), adapter(layers, "b", 2)
    x = torch.randn(3, 4)

    def run(active: DeviceAdapter) -> torch.Tensor:
        with manager.activate([ActiveLoRA(active, 0.5)]):
            return model(x)

    def expected(active: DeviceAdapter | None) -> torch.Tensor:
        h = x
        for i, layer in enumerate(layers):
            delta = 0.5 * active.modules[f"net.{i}"].delta(h) if active is not None else 0
            h = nn.functional.linear(h, layer.weight, layer.bias) + delta
        return h

    with torch.no_grad():
        outputs = [run(a), run(b), run(a), run(b)]
        plain = model(x)
        torch.testing.assert_close(outputs[0], expected(a))
        torch.testing.assert_close(outputs[1], expected(b))
        assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
        torch.testing.assert_close(plain, expected(None))  # outside activate: no delta
    assert manager.hooked_modules == MODULES
    # one set object for both adapters: the next switch is `current is names`, not a name-by-name ==
    assert manager._component_names(a, "net") is manager._component_names(b, "net")
    with manager.activate([]):
        pass
    assert manager.hooked_modules == 0
    manager.remove()
