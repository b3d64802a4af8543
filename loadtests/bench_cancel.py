"""What the cancel hooks (service/engine/cancel.py) cost on the normal path, and how fast they stop.

    python -m loadtests.bench_cancel [--rounds 20] [--size 32] [--steps 8]

1. per block: a module call with the forward pre-hook (``should_stop`` included) minus one without;
2. per request: ``sample`` with and without the hooks, interleaved (A B B A …) so drift and other load
   hit both alike; reports the medians and their difference;
3. latency: a request whose blocks are slowed (a sleep per block, as a step of a huge image) is
   abandoned mid-step; reports how long the worker took to get out of ``sample``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from basemodel.loader import load_base_model
from basemodel.tiny import ensure_tiny
from service.engine import sampler
from service.engine.cancel import Cancelled, blocks, interruptible
from service.engine.sampler import SampleParams, StageTimer, sample


def per_hook_s(calls: int = 100_000) -> float:
    """A module call with the hook minus one without (nn.Module's hook path included), in seconds."""
    block = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    x = torch.zeros(1)
    stop = threading.Event()
    deadline = time.monotonic() + 3600

    def timed() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            block(x)
        return (time.perf_counter() - started) / calls

    holder = torch.nn.ModuleList([block])
    plain, hooked = [], []
    for _ in range(5):
        plain.append(timed())
        with interruptible(holder, lambda: stop.is_set() or time.monotonic() > deadline):
            hooked.append(timed())
    return statistics.median(hooked) - statistics.median(plain)


def request_s(pipe: Any, params: SampleParams, hooked: bool) -> float:
    patch = nullcontext() if hooked else mock.patch.object(sampler, "interruptible", _no_hooks)
    with patch:
        started = time.perf_counter()
        sample(pipe, params, StageTimer(), lambda: False)
        return time.perf_counter() - started


def _no_hooks(_denoiser: Any, _should_stop: Any) -> Any:
    return nullcontext()


def stop_latency_s(pipe: Any, params: SampleParams, sleep_s: float) -> tuple[float, float]:
    """(step time, seconds from the cancel to ``sample`` raising) with every block slowed by ``sleep_s``."""
    slow = [b.register_forward_pre_hook(lambda *_: time.sleep(sleep_s)) for b in blocks(pipe.unet)]
    stop = threading.Event()
    cancelled_at: list[float] = []
    try:
        step = len(slow) * sleep_s

        def cancel() -> None:
            time.sleep(step / 2)
            cancelled_at.append(time.perf_counter())
            stop.set()

        threading.Thread(target=cancel).start()
        try:
            sample(pipe, params, StageTimer(), stop.is_set)
        except Cancelled:
            return step, time.perf_counter() - cancelled_at[0]
        raise AssertionError("not cancelled")
    finally:
        for handle in slow:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp())
    ensure_tiny(home / "models")
    base = load_base_model("tiny-sd", home / "models", device="cpu", dtype="fp32")
    pipe = base.pipe
    params = SampleParams("a red circle", "", args.steps, 7.5, args.size, args.size, 0, 1, "ddim")
    count = len(blocks(pipe.unet))
    hook = per_hook_s()
    per_forward = count * hook
    print(
        f"blocks hooked: {count}; one hook call: {hook * 1e6:.2f} µs; per forward: {per_forward * 1e6:.1f} µs"
    )
    request_s(pipe, params, True)  # warm
    timings: dict[bool, list[float]] = {True: [], False: []}
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        for hooked in order:
            timings[hooked].append(request_s(pipe, params, hooked))
    on, off = statistics.median(timings[True]), statistics.median(timings[False])
    forward = on / args.steps
    print(
        f"request ({args.size}px, {args.steps} steps, {args.rounds} rounds interleaved): "
        f"with hooks {on * 1e3:.2f} ms, without {off * 1e3:.2f} ms (median), "
        f"difference {(on - off) * 1e3:+.2f} ms ({(on - off) / off * 100:+.2f} %); "
        f"hook calls {per_forward * args.steps * 1e3:.3f} ms of it "
        f"({per_forward / forward * 100:.2f} % of a step)"
    )
    step, latency = stop_latency_s(pipe, SampleParams("a", "", 1, 7.5, 32, 32, 0, 1, "ddim"), 0.1)
    print(f"cancel inside a {step:.1f} s step: out of sample() {latency * 1e3:.0f} ms after the cancel")


if __name__ == "__main__":
    main()
