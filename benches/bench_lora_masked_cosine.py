"""lora_masked_cosine: every available backend against 'torch dense' (both d_out x d_in products formed) and the
reference, on r = 128 LoRA factors of real Llama-3 shapes (bf16).
"""

import pytest

from benches._bench import DEVICE, DTYPE, providers, run_bench
from nlsr_fast.bench.cases import TORCH_DENSE, make_case

OP = "lora_masked_cosine"


@pytest.mark.benchmark(group=OP)
@pytest.mark.parametrize("provider", [TORCH_DENSE, *providers(OP)])
def test_bench_lora_masked_cosine(benchmark, provider, lora_shape):
    run_bench(benchmark, make_case(OP, lora_shape, DTYPE, DEVICE), provider)
