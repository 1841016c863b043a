"""BufferPool: a big buffer is handed out again only when nothing refers to its storage."""

from __future__ import annotations

import threading

import numpy as np
import torch

from nlsr_fast.io.stream import BufferPool, buffer_pool, new_buffer

BIG = BufferPool.MIN_BYTES


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_idle_buffer_is_reused_and_a_referenced_one_never() -> None:
    pool = BufferPool()
    a = pool.take(BIG)
    first = _ptr(a)
    b = pool.take(BIG)  # `a` is alive: a second buffer
    assert _ptr(b) != first
    kept = a.view(torch.int16)[5:]  # a view outlives the tensor it came from
    del a
    c = pool.take(BIG)
    assert _ptr(c) not in (first, _ptr(b))
    del kept
    d = pool.take(BIG)  # now the first one is idle again
    assert _ptr(d) == first


def test_numpy_arrays_and_memoryviews_count_as_references() -> None:
    pool = BufferPool()
    a = pool.take(BIG)
    first = _ptr(a)
    mv = memoryview(a.numpy()).cast("B")  # what a pending hash or write holds
    arr = np.frombuffer(mv, dtype=np.uint8)
    del a
    assert _ptr(pool.take(BIG)) != first
    del arr, mv
    assert _ptr(pool.take(BIG)) == first


def test_small_or_other_sizes_are_fresh_and_outside_a_pool_nothing_is_kept() -> None:
    pool = BufferPool()
    assert pool.take(1000).numel() == 1000
    a = pool.take(BIG)
    first = _ptr(a)
    del a
    assert pool.take(BIG + 8).numel() == BIG + 8  # another size: another buffer
    assert new_buffer(BIG).numel() == BIG  # no active pool
    with buffer_pool():
        x = new_buffer(BIG)
        p = _ptr(x)
        del x
        assert _ptr(new_buffer(BIG)) == p
    assert _ptr(pool.take(BIG)) == first


def test_threads_never_get_the_same_buffer_at_once() -> None:
    pool = BufferPool()
    seen: list[int] = []
    lock = threading.Lock()
    held: list[torch.Tensor] = []

    def grab() -> None:
        t = pool.take(BIG)
        with lock:
            seen.append(_ptr(t))
            held.append(t)

    threads = [threading.Thread(target=grab) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 6


def test_at_most_one_idle_buffer_of_other_sizes_is_kept() -> None:
    pool = BufferPool()
    burst = [pool.take(BIG) for _ in range(3)]
    ptrs = {_ptr(t) for t in burst}
    del burst  # three idle buffers of one size
    other = pool.take(BIG + 64)  # asking for another size drops two of them
    assert len(pool._free[BIG]) == 1 and _ptr(pool._free[BIG][0][0]) in ptrs
    del other
