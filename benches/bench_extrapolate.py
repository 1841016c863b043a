"""extrapolate: every available backend against the reference baseline, on real Llama-3 shapes (bf16)."""

import pytest

from benches._bench import DEVICE, DTYPE, providers, run_bench
from nlsr_fast.bench.cases import make_case

OP = "extrapolate"


@pytest.mark.benchmark(group=OP)
@pytest.mark.parametrize("provider", providers(OP))
def test_bench_extrapolate(benchmark, provider, matrix_shape, copy_gbps):
    run_bench(benchmark, make_case(OP, matrix_shape, DTYPE, DEVICE), provider, copy_gbps)
