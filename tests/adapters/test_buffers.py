"""The cold-load buffer pool: memory is recycled only once nothing refers to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from adapters.buffers import BufferPool

MIB = 1 << 20

HOLDERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "slice": lambda b: b[5:],
    "dtype view": lambda b: b.view(torch.float32),
    "as_strided": lambda b: b.as_strided((4,), (1,), 8),
    "numpy array": lambda b: b.numpy(),
    "memoryview": lambda b: memoryview(b.numpy()),
    "storage": lambda b: b.untyped_storage(),
    "converted tensors": lambda b: b.view(torch.float32)[:16].view(4, 4),
}


@pytest.mark.parametrize("holder", HOLDERS)
def test_memory_anything_still_refers_to_is_never_handed_out_again(holder: str) -> None:
    pool = BufferPool(64 * MIB)
    buffer = pool.take(3 * MIB)
    address = buffer.data_ptr()
    held = HOLDERS[holder](buffer)
    del buffer  # the caller is done with the buffer itself, but ``held`` still reads its memory
    other = pool.take(3 * MIB)
    assert other.data_ptr() != address
    del held
    assert pool.take(3 * MIB).data_ptr() == address  # free now: recycled
    assert pool.stats.reused == 1


def test_a_free_buffer_serves_only_requests_of_about_its_size() -> None:
    pool = BufferPool(64 * MIB)
    address = pool.take(4 * MIB).data_ptr()
    assert pool.take(2 * MIB).data_ptr() != address  # half of it: a new buffer, not a waste of 2 MiB
    assert pool.take(5 * MIB).data_ptr() != address  # bigger: cannot
    reused = pool.take(int(3.5 * MIB))  # within 1.25x
    assert reused.data_ptr() == address and reused.numel() == int(3.5 * MIB) and reused.is_contiguous()


def test_free_memory_beyond_the_limit_is_released() -> None:
    pool = BufferPool(5 * MIB)
    for _ in range(4):
        pool.take(2 * MIB)  # each dropped at once: free again
    taken = [pool.take(2 * MIB) for _ in range(4)]  # four at once: two recycled, two new
    del taken
    assert pool.stats.buffers == 4
    pool.take(8 * MIB)  # no fit: free buffers go until the free ones and the new one fit 5 MiB
    assert pool.stats.released == 4 and pool.stats.buffers == 1


def test_small_buffers_and_a_zero_limit_are_plain_allocations() -> None:
    for pool, size in ((BufferPool(64 * MIB), MIB // 2), (BufferPool(0), 2 * MIB)):
        first = pool.take(size).data_ptr()
        pool.take(size)
        assert pool.stats.taken == 0 and pool.stats.buffers == 0, first


def test_free_memory_beyond_the_limit_is_released_even_when_a_buffer_fits() -> None:
    pool = BufferPool(5 * MIB)
    taken = [pool.take(2 * MIB) for _ in range(6)]  # all in use: 12 MiB held
    del taken  # all free: 12 MiB, over the 5 MiB limit
    reused = pool.take(2 * MIB)  # one fits; of the other five free buffers only two stay
    assert pool.stats.reused == 1 and pool.stats.released == 3
    assert pool.stats.buffers == 3 and pool.stats.free_bytes == 4 * MIB and reused.numel() == 2 * MIB
