"""Recycled CPU byte buffers for cold loads: a file's read buffer and its converted tensors.

A cold load on a CPU model writes about three times the file's bytes into memory it has just allocated
(the file read, then its fp16 values converted to fp32). Large allocations come fresh from the kernel,
so every 4 KiB page of them faults on first touch; on cpu-2c that was about 5 ms of a 13 ms SD1.5
cold load (4,400 page faults, measured in thread CPU time). CUDA has caching allocators for exactly
this (device memory, and page-locked host memory); plain CPU tensors have none. ``BufferPool`` is one
for the cache's two kinds of large buffers: it hands out ``uint8`` tensors and takes a buffer back
**only when nothing refers to its memory any more** (no tensor, view, array or storage object: its
storage's use count and the storage object's reference count are the pool's own), so an adapter
evicted from a cache tier lends its memory to the next cold load while a request still running with
it keeps it. Free buffers beyond ``max_free_bytes`` are released.

Buffers under ``min_bytes`` are plain allocations (the C allocator reuses small blocks anyway).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import torch

__all__ = ["BufferPool", "PoolStats"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is reused
FIT = 1.25  # a free buffer serves a request of at least 1/FIT of its size
STORAGE_REFS = 2  # the pool's tensor and the storage's own Python object
PYTHON_REFS = 3  # ``storage`` in ``_free``, ``getrefcount``'s argument and the tensor's slot


@dataclass
class PoolStats:
    taken: int = 0  # buffers handed out
    reused: int = 0  # of which were recycled memory
    released: int = 0  # free buffers dropped to stay under max_free_bytes
    buffers: int = 0  # buffers the pool holds (in use or free)
    free_bytes: int = 0  # of those, the bytes free at the last ``take``


class BufferPool:
    """Large ``uint8`` CPU buffers, recycled once nothing refers to them (see the module doc)."""

    def __init__(self, max_free_bytes: int, *, min_bytes: int = 1 << 20) -> None:
        self.max_free_bytes = max_free_bytes
        self.min_bytes = min_bytes
        self.stats = PoolStats()
        self._buffers: list[torch.Tensor] = []  # oldest first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return _use_count is not None and self.max_free_bytes > 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A contiguous ``uint8`` CPU tensor of ``nbytes`` (its contents undefined), 64-byte aligned."""
        if nbytes < self.min_bytes or not self.enabled:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:  # one check per buffer held: ~0.2 µs each
            self.stats.taken += 1
            free = [buffer for buffer in self._buffers if _free(buffer)]
            fits = [b for b in free if nbytes <= b.numel() <= nbytes * FIT]
            chosen = min(fits, key=torch.Tensor.numel) if fits else None
            self._release([b for b in free if b is not chosen], room=0 if chosen is not None else nbytes)
            if chosen is not None:
                self.stats.reused += 1
                return chosen[:nbytes]  # a view: the buffer is now in use
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._buffers.append(buffer)
            self.stats.buffers = len(self._buffers)
            return buffer[:nbytes]

    def _release(self, free: list[torch.Tensor], room: int) -> None:
        """Drop the oldest free buffers until the free ones left and a new one of ``room`` bytes fit
        ``max_free_bytes`` (a new buffer is counted because its memory outlives its first use). Memory
        freed by evictions is given back here, at the next ``take``."""
        free_bytes = sum(b.numel() for b in free)
        dropped: set[int] = set()  # by identity: ``==`` on tensors compares their values
        for buffer in free:
            if free_bytes + room <= self.max_free_bytes:
                break
            dropped.add(id(buffer))
            free_bytes -= buffer.numel()
            self.stats.released += 1
        if dropped:
            self._buffers = [b for b in self._buffers if id(b) not in dropped]
        self.stats.buffers = len(self._buffers)
        self.stats.free_bytes = free_bytes


def _free(buffer: torch.Tensor) -> bool:
    """Whether only the pool refers to ``buffer``'s memory: no other tensor or view of its storage
    (the storage's use count) and no other holder of the storage object (its Python reference count)."""
    assert _use_count is not None
    storage = buffer.untyped_storage()
    return bool(_use_count(storage._cdata) <= STORAGE_REFS and sys.getrefcount(storage) <= PYTHON_REFS)
