"""The body every bench_<op>.py shares: time one provider, check it once against the reference, record bytes."""

from __future__ import annotations

import torch

from nlsr_fast.bench.cases import STREAMING_OPS, Case, backends_on, check
from nlsr_fast.bench.timing import sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16


def providers(op: str) -> list[str]:
    """Registered backends usable here, reference first (the baseline); a host op's host backends (HOST_OPS)."""
    return backends_on(op, DEVICE)


def run_bench(benchmark, case: Case, provider: str, copy_gbps: float | None = None) -> None:
    def run():
        out = case.run(provider)
        sync(DEVICE)  # time the kernel, not the launch
        return out

    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    # A fast wrong answer is not a result (fresh runs: a reused output buffer is poisoned and copied out).
    problem = check(case, case.run_fresh(provider), case.run_fresh("reference"), backend=provider)
    assert problem is None, f"{case.op}[{provider}] {case.shape} {case.dtype}: {problem}"
    benchmark.extra_info.update(
        op=case.op, provider=provider, shape=list(case.shape), dtype=str(case.dtype), bytes=case.bytes, flops=case.flops
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats["median"]
        gbps = case.bytes / median / 1e9
        benchmark.extra_info["GB/s"] = round(gbps, 2)
        if case.flops:
            benchmark.extra_info["GFLOP/s"] = round(case.flops / median / 1e9, 2)
        if copy_gbps and case.op in STREAMING_OPS:
            benchmark.extra_info["pct_copy"] = round(100 * gbps / copy_gbps, 1)
