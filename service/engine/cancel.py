"""Stopping an abandoned job inside a denoising step, not only between two.

A step of a large image can take minutes (a 512×512 request on tiny-sd: 65,536 attention tokens), so
the worker also checks ``should_stop`` before each block of the denoiser: forward pre-hooks on every
module held in one of its ``nn.ModuleList``s that is itself made of parts (a UNet's down/up blocks,
their resnets and attentions, the transformer blocks in those; a DiT's ``transformer_blocks``). That
is generic over the denoiser (``pipe.unet`` or ``pipe.transformer``), and leaves out list entries that
are single layers (``to_out``'s Linear and Dropout), which would only add calls. A hook raises
``Cancelled``; what the loop holds (fused LoRA weights, hooks) is undone by the context managers the
exception passes through, as for a cancel between steps.

The hooks are on only while a job denoises, and cost a Python call and ``should_stop`` (an Event and a
clock read) per block: tiny-sd has 26 such blocks, SD1.5 61, SDXL 103, Flux 57, SD3 18
(docs/reliability.md, "Bounded work per request", has the measured overhead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

from torch import nn


class Cancelled(Exception):
    """The job was abandoned (client gone, job cancelled or deadline passed) during denoising."""


_BLOCKS: WeakKeyDictionary[nn.Module, list[nn.Module]] = WeakKeyDictionary()


def blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The modules a cancel is checked before: entries of the denoiser's ModuleLists with ≥ 2 parts
    (found once per denoiser: walking SDXL's UNet takes milliseconds)."""
    found = _BLOCKS.get(denoiser)
    if found is None:
        found = [
            entry
            for module in denoiser.modules()
            if isinstance(module, nn.ModuleList)
            for entry in module
            if len(entry._modules) >= 2
        ]
        _BLOCKS[denoiser] = found
    return found


@contextmanager
def interruptible(denoiser: nn.Module, should_stop: Callable[[], bool]) -> Iterator[None]:
    """While inside, a forward of ``denoiser`` raises ``Cancelled`` at its next block once
    ``should_stop()`` is true."""

    def check(_module: nn.Module, _args: Any) -> None:
        if should_stop():
            raise Cancelled

    handles = [block.register_forward_pre_hook(check) for block in blocks(denoiser)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
