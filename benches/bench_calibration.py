"""Sequential low_rank calibration: the streamed engine vs the released schedule (whole-model forward per layer).

A tiny Llama (8 layers) with an r=8 adapter on all seven projections and 64 calibration samples. Both compute the
projected factors layer after layer (layers < ℓ projected before layer ℓ's statistics); the results must match
(factors within fp32 round-off, masks identical up to ties) and the streamed engine must be ≥ 3× faster.

    python -m benches.bench_calibration        # table + bar
    pytest benches/bench_calibration.py        # the same, as a test (the time bar is reported, not asserted)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

LAYERS = 8
N_SAMPLES = 64
SPARSITY = 0.8
BATCH = 16
BAR = 3.0


def _setup(root: Path, hidden: int = 128, intermediate: int = 256):
    from transformers import AutoTokenizer

    from nlsr_fast.calib import load_calibration
    from nlsr_fast.io import LoraAdapter
    from nlsr_fast.testing import make_lora_adapter, make_tiny_llama, write_calibration_jsonl

    base = make_tiny_llama(root / "base", layers=LAYERS, hidden=hidden, intermediate=intermediate, heads=4,
                           kv_heads=2, max_shard_size="200KB")
    adapter = make_lora_adapter(root / "adapter", base, r=8, alpha=16.0, std=0.1)
    tok = AutoTokenizer.from_pretrained(base)
    calib = load_calibration(write_calibration_jsonl(root / "calib.jsonl", n=N_SAMPLES), tok, nsamples=N_SAMPLES)
    ad = LoraAdapter.load(adapter)
    factors = {n: (*[f.float() for f in ad.factors(n)], ad.scale(n)) for n in ad.modules}
    return base, adapter, calib, factors


def run(root: str | None = None) -> dict:
    from nlsr_fast.calib import collect_lora_statistics, low_rank_topk_masks, project_factors
    from nlsr_fast.calib.hf_reference import hf_peft_model, released_schedule
    from nlsr_fast.io import CheckpointReader

    root_p = Path(root or tempfile.mkdtemp())
    base, adapter, calib, factors = _setup(root_p)
    streamed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def transform(layer, stats):
        out = {n: project_factors(factors[n][0], factors[n][1], s.gram, SPARSITY) for n, s in stats.items()}
        streamed.update(out)
        return out

    t0 = time.perf_counter()
    s_stats = collect_lora_statistics(CheckpointReader(base), factors, calib, sequential=True, transform=transform,
                                      micro_batch=BATCH)
    t_stream = time.perf_counter() - t0

    peft = hf_peft_model(base, adapter, factors)
    t0 = time.perf_counter()
    r_stats, released = released_schedule(peft, calib, SPARSITY, LAYERS, batch_size=BATCH)
    t_released = time.perf_counter() - t0

    worst = 0.0
    mask_diff = 0
    for n in factors:
        for a, b in zip(streamed[n], released[n], strict=True):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
        ms = low_rank_topk_masks(factors[n][0], factors[n][1], s_stats[n].gram, SPARSITY, backend="reference")
        mr = low_rank_topk_masks(factors[n][0], factors[n][1], r_stats[n].gram, SPARSITY, backend="reference")
        mask_diff += sum(int((x.to_bool() ^ y.to_bool()).sum()) for x, y in zip(ms, mr, strict=True))
    return {"streamed_s": t_stream, "released_s": t_released, "ratio": t_released / t_stream,
            "max_rel_factor_diff": worst, "mask_entries_differing": mask_diff, "modules": len(factors)}


def report(res: dict) -> bool:
    print(f"sequential low_rank, tiny Llama {LAYERS} layers, {N_SAMPLES} samples, {res['modules']} modules, "
          f"micro-batch {BATCH}")
    print(f"  streamed engine      {res['streamed_s']:8.2f} s")
    print(f"  released schedule    {res['released_s']:8.2f} s")
    print(f"  speed-up             {res['ratio']:8.2f} x   (bar >= {BAR:.0f}x)")
    print(f"  max rel. diff of projected factors {res['max_rel_factor_diff']:.2e}; "
          f"mask entries differing {res['mask_entries_differing']}")
    return res["ratio"] >= BAR


def test_realign_schedule_matches_released():
    res = run()
    report(res)
    assert res["max_rel_factor_diff"] < 1e-3
    assert res["mask_entries_differing"] == 0


if __name__ == "__main__":
    ok = report(run())
    print("PASS" if ok else "FAIL")
