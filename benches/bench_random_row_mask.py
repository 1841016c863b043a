"""random_row_mask: every available (host) backend against 'randn+topk', the path it replaces (torch.randn scores
ranked with row_topk_mask), and the reference, on the r = 128 LoRA factors of a Llama-3-70B gate_proj."""

import pytest

from benches._bench import DEVICE, DTYPE, providers, run_bench
from nlsr_fast.bench.cases import RANDN_TOPK, make_case

OP = "random_row_mask"


@pytest.mark.benchmark(group=OP)
@pytest.mark.parametrize("provider", [RANDN_TOPK, *providers(OP)])
def test_bench_random_row_mask(benchmark, provider, factor_shape):
    run_bench(benchmark, make_case(OP, factor_shape, DTYPE, DEVICE), provider)
