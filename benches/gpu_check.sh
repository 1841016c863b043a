#!/usr/bin/env bash
# GPU device check for the triton backend, on one H200 with a fresh checkout and no network:
#   1. install the package in place from what the machine's image holds (setuptools, pybind11, cmake, ninja,
#      torch and triton are there; nothing can be fetched, so no build isolation and no dependency resolution);
#   2. every triton test of tests/ops on CUDA, the `gpu` ones included (int64 addressing past 2**31 elements);
#   3. `python -m nlsr_fast.bench` at Llama-3-70B shapes (GB/s and % of copy bandwidth per backend).
# Results go under $OUT (at most 8 files): env.txt, install.log, pytest.log, pytest.xml, bench.txt, bench.json,
# summary.txt. Sized for one 10-minute call: install ~1 min, tests <= 5 min, bench <= 3 min.
# Usage (repository root): OUT=/some/dir bash benches/gpu_check.sh
set -uo pipefail

OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
summary "env: $(tail -n 1 "$OUT/env.txt")"

start=$SECONDS
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/install.log" 2>&1; then
    # the triton backend needs no C++ core: fall back to a pure-Python install and keep going
    summary "install with the C++ extension failed (install.log); retrying with NLSR_FAST_NO_EXT=1"
    NLSR_FAST_NO_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/install.log" 2>&1 \
        || { summary "install failed"; exit 1; }
fi
"$PY" -c "import torch; from nlsr_fast.ops import OPS, available
assert torch.cuda.is_available(), 'no CUDA device'
missing = [op for op in OPS if 'triton' not in [b.value for b in available(op, 'cuda')]]
assert not missing, f'no triton backend on cuda for {missing}'" >>"$OUT/install.log" 2>&1 \
    || { summary "triton backend not available on cuda (install.log)"; exit 1; }
summary "install: ok in $((SECONDS - start)) s"

start=$SECONDS
timeout 300 "$PY" -m pytest tests/ops -m "gpu or not gpu" -k triton -q -rfE -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
rc=$?
summary "pytest (triton, cuda): rc=$rc in $((SECONDS - start)) s: $(tail -n 1 "$OUT/pytest.log")"

start=$SECONDS
# 70B: q/o_proj 8192x8192, down_proj 8192x28672 (rows of 28672 columns), LoRA r=128 on down_proj
timeout 180 "$PY" -m nlsr_fast.bench --shapes 8192x8192 8192x28672 128x8192x28672 --dtype bf16 \
    --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1
brc=$?
summary "bench (70B shapes, bf16): rc=$brc in $((SECONDS - start)) s (bench.txt)"
[ "$rc" -eq 0 ] && [ "$brc" -eq 0 ]
