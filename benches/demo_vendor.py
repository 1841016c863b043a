"""Does the demo's numerics depend on the CPU vendor? Runs one workload under several CPU models and MKL_CBWR settings
and prints which runs gave the same bits.

The CPU models other than the host are emulated by `qemu-x86_64 -cpu MODEL` (Debian's qemu-user): MKL reads the
vendor and the features from CPUID, which qemu answers as the model would. Emulation is not bit-faithful to the host
for every instruction (see benches/results/demo_vendor.md), so runs are compared with each other within emulation:
an Intel model against an AMD one.

Workloads, each in a fresh process with the demo's pins (nlsr_fast.demo.determinism.PINNED_ENV) but MKL_CBWR:
- probe: a 2-layer Llama (hidden 48), three AdamW steps; the sha256 of its parameters after each step, and of a few
  single ops (linear, softmax, silu, rsqrt, exp, sum). About 5 s on the host, 1-2 minutes emulated.
- train: the demo's world trained for 20 + 1 + 1 steps (base, aligned and fine-tuned adapters), the sha256 of every
  tensor it wrote. About 10 s on the host, about 20 minutes emulated.

    python benches/demo_vendor.py [--workload probe|train] [--cpus host,Haswell,EPYC] [--cbwr AVX2,COMPATIBLE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from nlsr_fast.demo.determinism import PINNED_ENV

_PROBE = """
import hashlib, sys, torch
torch.set_num_threads(1); torch.manual_seed(0); torch.use_deterministic_algorithms(True)
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(0)
out = []
for step in range(3):
    ids = torch.randint(0, 200, (4, 24), generator=g)
    model(ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    out.append(f"step{step}={h.hexdigest()[:12]}")
x, w = torch.randn(64, 48, generator=g), torch.randn(128, 48, generator=g)
ops = {"linear": torch.nn.functional.linear(x, w), "softmax": torch.softmax(x, -1), "silu": torch.nn.functional.silu(x),
       "rsqrt": torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), "exp": torch.exp(x), "sum": x.sum(0)}
out += [f"{k}={hashlib.sha256(v.numpy().tobytes()).hexdigest()[:8]}" for k, v in ops.items()]
print("RESULT", " ".join(out))
"""

_TRAIN = """
import hashlib, sys
from pathlib import Path
import torch
from safetensors import safe_open
from nlsr_fast.demo.train import Schedule, build_world
from nlsr_fast.demo.world import make_splits
torch.set_num_threads(1)
root = Path(sys.argv[1])
build_world(root, make_splits(0), harmful_share=0.2, seed=0, schedule=Schedule(pretrain_steps=20, aligned_steps=1,
                                                                               finetune_steps=1))
h, n = hashlib.sha256(), 0
for path in sorted(root.rglob("*.safetensors")):
    with safe_open(path, "pt") as f:
        for key in sorted(f.keys()):
            h.update(f.get_tensor(key).contiguous().view(torch.uint8).numpy().tobytes()); n += 1
print("RESULT", f"tensors={n}", f"sha256={h.hexdigest()[:16]}")
"""


def run(workload: str, cpu: str, cbwr: str) -> tuple[str, float]:
    env = {**os.environ, **PINNED_ENV, "MKL_CBWR": cbwr}
    prefix = [] if cpu == "host" else ["qemu-x86_64", "-cpu", cpu]
    work = tempfile.mkdtemp(prefix="demo_vendor_")
    try:
        start = time.perf_counter()
        proc = subprocess.run([*prefix, sys.executable, "-c", _PROBE if workload == "probe" else _TRAIN, work],
                              env=env, capture_output=True, text=True, cwd=work)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{workload} on {cpu} with MKL_CBWR={cbwr} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return lines[-1].removeprefix("RESULT "), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["probe", "train"], default="probe")
    parser.add_argument("--cpus", default="host,Haswell,EPYC", help="host and/or qemu-x86_64 CPU models")
    parser.add_argument("--cbwr", default="AVX2,COMPATIBLE", help="MKL_CBWR values")
    args = parser.parse_args()
    cpus, settings = args.cpus.split(","), args.cbwr.split(",")
    if any(c != "host" for c in cpus) and shutil.which("qemu-x86_64") is None:
        raise SystemExit("qemu-x86_64 not found (Debian: apt-get install qemu-user)")
    print(f"workload {args.workload}; pins {PINNED_ENV} but MKL_CBWR\n")
    print("| MKL_CBWR | CPU | result | same as | seconds |\n|---|---|---|---|---|")
    for cbwr in settings:
        seen: dict[str, str] = {}
        for cpu in cpus:
            result, seconds = run(args.workload, cpu, cbwr)
            print(f"| {cbwr} | {cpu} | `{result}` | {seen.get(result, '-')} | {seconds:.1f} |", flush=True)
            seen.setdefault(result, cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
