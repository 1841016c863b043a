"""Kill-and-resume on a real model: how much of a killed run a resumed run skips, and that it ends byte-identical.

    python benches/resume_smollm2.py BASE ALIGNED FINETUNED CALIBRATION.jsonl --work DIR [--kill-layer 20]

BASE/ALIGNED/FINETUNED are the SmolLM2-135M-Instruct base (bf16 safetensors) and two LoRA adapters on it, as
benches/e2e_smollm2.py makes them in its work folder. Three runs of `realign` (low_rank, paper preset), each in its
own process: an uninterrupted one; one SIGKILLed as calibration loads layer --kill-layer (the calibration state is
saved after every layer here, every 600 s by default); the same command again, which resumes. Prints the three
times and whether the two outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, os, signal, sys, time
import nlsr_fast, nlsr_fast.runs, nlsr_fast.calib.runtime as rt
nlsr_fast.runs.CALIBRATION_CHECKPOINT_SECONDS = 0.0
kill_at = int(sys.argv[6])
original = rt._Model.layer
def layer(self, idx):
    if idx == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, idx)
rt._Model.layer = layer
start = time.perf_counter()
report = nlsr_fast.realign(*sys.argv[1:5], calibration=sys.argv[5], method="low_rank", nsamples=128, quiet=True)
print(json.dumps({"seconds": time.perf_counter() - start, "calibrate": report.timings.get("calibrate")}))
"""


def _run(paths: list[str], out: Path, kill_layer: int) -> dict | None:
    run = subprocess.run([sys.executable, "-c", _CHILD, *paths[:3], str(out), paths[3], str(kill_layer)],
                         capture_output=True, text=True)
    if run.returncode < 0:
        return None
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("aligned")
    p.add_argument("finetuned")
    p.add_argument("calibration")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--kill-layer", type=int, default=20)
    args = p.parse_args()
    paths = [args.base, args.aligned, args.finetuned, args.calibration]
    for name in ("whole", "resumed", "resumed.partial", "resumed.lock"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    whole = _run(paths, args.work / "whole", -1)
    killed = _run(paths, args.work / "resumed", args.kill_layer)
    assert killed is None, "the run was not killed"
    resumed = _run(paths, args.work / "resumed", -1)
    assert whole is not None and resumed is not None
    same = all((args.work / "whole" / f.name).read_bytes() == f.read_bytes()
               for f in (args.work / "resumed").iterdir() if f.name not in ("report.json", "manifest.json"))
    print(f"uninterrupted: {whole['seconds']:.1f} s (calibration {whole['calibrate']:.1f} s)")
    print(f"resumed after a kill at layer {args.kill_layer}: {resumed['seconds']:.1f} s "
          f"(calibration {resumed['calibrate']:.1f} s)")
    print(f"outputs byte-identical (all files but report.json and manifest.json): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
