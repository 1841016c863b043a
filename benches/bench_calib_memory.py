"""Peak memory of the streamed calibration does not grow with depth (docs/architecture.md, "The two passes").

Synthetic Llama checkpoints (hidden 1024, intermediate 2816, 16 heads, random bf16 weights, sharded, cached) at 4 and
16 layers; the same 32-sample calibration set and random r=16 factors on all seven projections. Each depth runs
`collect_lora_statistics` in a fresh subprocess, which reports its RSS just before calibration and its peak RSS
(ru_maxrss) after. Bar: (growth at 16 layers) − (growth at 4 layers) < 20% of the 16-layer checkpoint size.

    python -m benches.bench_calib_memory            # table + bar
    pytest benches/bench_calib_memory.py            # the same check as a test
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPTHS = (4, 16)
N_SAMPLES = 32
BAR = 0.20


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(folder: str, calib_path: str, sequential: bool) -> dict:
    """Run in the subprocess: load everything, measure RSS, calibrate, report peak RSS growth (bytes)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)
    from transformers import AutoTokenizer

    from benches.make_synthetic import random_lora_factors
    from nlsr_fast.calib import collect_lora_statistics, load_calibration, project_factors
    from nlsr_fast.io import CheckpointReader

    tok = AutoTokenizer.from_pretrained(folder)
    calib = load_calibration(calib_path, tok, nsamples=N_SAMPLES)
    factors = random_lora_factors(folder)
    reader = CheckpointReader(folder)
    before = _rss_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()

    def transform(layer, stats):
        return {n: project_factors(factors[n][0], factors[n][1], s.gram, 0.8) for n, s in stats.items()}

    stats = collect_lora_statistics(reader, factors, calib, sequential=sequential,
                                    transform=transform if sequential else None)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_before": before * 1024,
        "peak_before": peak_before * 1024,
        "peak": peak * 1024,
        "growth": max(0, peak - before) * 1024,
        "seconds": secs,
        "modules": len(stats),
        "tokens": sum(x.n_tokens for x in calib.samples),
    }


def run(depths: tuple[int, ...] = DEPTHS, sequential: bool = True, root: str | None = None) -> dict:
    from benches.make_synthetic import folder_bytes, make_synthetic_llama
    from nlsr_fast.testing import write_calibration_jsonl

    results = {}
    calib = Path(tempfile.mkdtemp()) / "calib.jsonl"
    write_calibration_jsonl(calib, n=N_SAMPLES, seed=0)
    repo = Path(__file__).resolve().parents[1]
    for L in depths:
        folder = make_synthetic_llama(L, root=root)
        code = ("import json,sys; from benches.bench_calib_memory import child; "
                f"print('RESULT', json.dumps(child({str(folder)!r}, {str(calib)!r}, {sequential})))")
        env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo)
        if out.returncode != 0:
            raise RuntimeError(f"calibration child for {folder} failed:\n{out.stderr[-4000:]}")
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        res = json.loads(line[len("RESULT "):])
        res["checkpoint_bytes"] = folder_bytes(folder)
        results[L] = res
    return results


def report(results: dict) -> tuple[float, bool]:
    mib = 1 << 20
    print(f"{'layers':>6} {'ckpt MiB':>9} {'RSS before':>11} {'peak':>9} {'growth MiB':>11} {'seconds':>8}")
    for L, r in results.items():
        print(f"{L:>6} {r['checkpoint_bytes'] / mib:>9.1f} {r['rss_before'] / mib:>11.1f} {r['peak'] / mib:>9.1f} "
              f"{r['growth'] / mib:>11.1f} {r['seconds']:>8.2f}")
    lo, hi = min(results), max(results)
    delta = results[hi]["growth"] - results[lo]["growth"]
    share = delta / results[hi]["checkpoint_bytes"]
    ok = share < BAR
    print(f"growth {lo}->{hi} layers: {delta / mib:.1f} MiB = {100 * share:.1f}% of the {hi}-layer checkpoint "
          f"(bar < {100 * BAR:.0f}%): {'PASS' if ok else 'FAIL'}")
    return share, ok


def test_calibration_memory_flat_in_depth():
    import pytest

    if os.environ.get("NLSR_BENCH_SHAPES", "") != "full":
        pytest.skip("memory bench writes ~0.5 GB of checkpoints; run with NLSR_BENCH_SHAPES=full or as a script")
    _, ok = report(run())
    assert ok


if __name__ == "__main__":
    report(run())
