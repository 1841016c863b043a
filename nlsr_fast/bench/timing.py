"""Wall-clock timing that waits for the device, and the machine's copy bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["copy_bandwidth", "median_seconds", "sync"]


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    min_total_s: float = 0.5,
) -> float:
    """Median of repeated timed calls: at least `min_repeats`, more until `min_total_s` or `max_repeats`."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < min_repeats or (sum(times) < min_total_s and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, **timing: Any) -> tuple[float, float]:
    """(GB/s, median seconds) of a plain dst.copy_(src) of `nbytes`; bytes moved = read + write = 2 * nbytes."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, **timing)
    return 2 * nbytes / seconds / 1e9, seconds
