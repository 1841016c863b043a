"""Bench configuration: real shapes for timed runs, small ones for the `--benchmark-disable` smoke run.

NLSR_BENCH_SHAPES=smoke|full overrides the choice (default: smoke when benchmarks are disabled, else full).
"""

from __future__ import annotations

import os

import pytest
import torch

from benches import shapes


def _smoke(config: pytest.Config) -> bool:
    forced = os.environ.get("NLSR_BENCH_SHAPES", "")
    if forced not in ("", "smoke", "full"):
        raise pytest.UsageError(f"NLSR_BENCH_SHAPES must be 'smoke' or 'full', got {forced!r}")
    if forced:
        return forced == "smoke"
    return bool(config.getoption("benchmark_disable", default=False))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    smoke = _smoke(metafunc.config)
    if "matrix_shape" in metafunc.fixturenames:
        table = shapes.SMOKE_SHAPES if smoke else {n: shapes.SHAPES[n] for n in shapes.BENCH_MATRIX}
        metafunc.parametrize("matrix_shape", list(table.values()), ids=list(table))
    if "lora_shape" in metafunc.fixturenames:
        table = shapes.SMOKE_LORA if smoke else {n: shapes.LORA_SHAPES[n] for n in shapes.BENCH_LORA}
        metafunc.parametrize("lora_shape", list(table.values()), ids=list(table))
    if "factor_shape" in metafunc.fixturenames:
        table = shapes.SMOKE_FACTORS if smoke else {n: shapes.FACTOR_SHAPES[n] for n in shapes.BENCH_FACTORS}
        metafunc.parametrize("factor_shape", list(table.values()), ids=list(table))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def copy_gbps(device: torch.device) -> float | None:
    """The device's copy bandwidth, the roofline for the streaming ops' % column (GPU runs only)."""
    if device.type != "cuda":
        return None
    from nlsr_fast.bench.timing import copy_bandwidth

    return copy_bandwidth(device, 1 << 30)[0]
