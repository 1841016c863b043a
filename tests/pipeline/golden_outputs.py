"""Output bytes of every method, preset and mode on tiny worlds, recorded once and compared ever after: a refactor
of how methods and runs are organised must not change a bit of any output.

    python tests/pipeline/golden_outputs.py --record tests/pipeline/golden_outputs.json   # before a change
    python tests/pipeline/golden_outputs.py --check tests/pipeline/golden_outputs.json    # after it (a test runs this)

Run under nlsr_fast.demo.determinism's pinned environment (one thread, AVX2 code paths, MKL's vendor-independent
mode), which makes the tiny models and the calibration forwards the same bits on every x86-64 machine; the test
starts this script with that environment. Compared: the sha256 of every weight file and of masks.safetensors, and the
restored modules of report.json (which name the difference when a digest moves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

#: (name, mode, method, preset, extra options); the calibration file is given to every method that needs one.
RUNS: tuple[tuple[str, str, str, str, dict[str, Any]], ...] = (
    *((f"lora/{m}/{p}", "lora", m, p, {}) for m in ("low_rank", "wanda", "snip", "pref_snip", "random")
      for p in ("paper", "official")),
    ("lora/low_rank/paper/no-sequential", "lora", "low_rank", "paper", {"sequential": False}),
    ("lora/wanda/paper/threshold", "lora", "wanda", "paper", {"selection": "threshold", "tau": 0.999}),
    ("lora/random/paper/fraction", "lora", "random", "paper", {"selection": "fraction", "fraction": 0.5}),
    *((f"dense/{m}/paper", "dense", m, "paper", {}) for m in ("magnitude", "random", "wanda", "snip")),
    ("dense/snip/official", "dense", "snip", "official", {}),
    ("dense/magnitude/paper/weight", "dense", "magnitude", "paper", {"score_on": "weight", "sparsity": 0.5}),
    # recorded when the methods below were added: later changes keep their bits too
    *((f"{mode}/{m}/paper", mode, m, "paper", {}) for mode in ("lora", "dense") for m in ("safelora", "antidote")),
    ("dense/resta/paper/dare", "dense", "resta", "paper", {"dare_rate": 0.3}),
)
DATA_FREE = ("random", "magnitude", "safelora", "resta")
#: Packages whose arithmetic decides the bits (model init, forwards, safetensors layout); other versions: no verdict.
VERSIONED = ("torch", "transformers", "peft", "safetensors")
VERSIONS_KEY = "_versions"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _worlds(root: Path) -> dict[str, dict[str, Path]]:
    import torch

    from nlsr_fast import testing

    torch.manual_seed(0)
    base = testing.make_tiny_llama(root / "base", layers=2, hidden=32, max_shard_size="20KB")
    aligned = testing.make_lora_adapter(root / "aligned", base, r=4, alpha=8.0, seed=1)
    lora = {"base": base, "aligned": aligned,
            "finetuned": testing.continue_lora_adapter(root / "finetuned", aligned, seed=2, std=0.05,
                                                       drift_modules=["layers.1.mlp", "q_proj"]),
            "calibration": testing.write_calibration_jsonl(root / "calibration.jsonl", 24),
            "pairs": testing.write_calibration_jsonl(root / "pairs.jsonl", 12, pairs=True)}
    dbase = testing.make_tiny_llama(root / "dbase", layers=2, hidden=32, dtype=torch.bfloat16)
    daligned = testing.derive_checkpoint(root / "daligned", dbase, seed=1)
    dense = {"base": dbase, "aligned": daligned,
             "finetuned": testing.derive_checkpoint(root / "dfinetuned", daligned, seed=2, move=r"(_proj|norm|embed)"),
             "calibration": testing.write_calibration_jsonl(root / "dcalibration.jsonl", 12)}
    return {"lora": lora, "dense": dense}


def outputs(root: Path) -> dict[str, dict[str, Any]]:
    """{run name: {file: sha256, "restored": [...]}} of every run in RUNS."""
    import nlsr_fast

    worlds = _worlds(root)
    got: dict[str, dict[str, Any]] = {}
    for name, mode, method, preset, extra in RUNS:
        w = worlds[mode]
        calib = None if method in DATA_FREE else w["pairs" if method == "pref_snip" else "calibration"]
        out = root / "out" / name.replace("/", "_")
        report = nlsr_fast.realign(w["base"], w["aligned"], w["finetuned"], out, calibration=calib, mode=mode,
                                   method=method, preset=preset, device="cpu", quiet=True, **extra)
        files = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
        got[name] = {p.name: _sha256(p) for p in files} | {"restored": report.restored}
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the digests to this JSON file")
    group.add_argument("--check", type=Path, help="compare with the digests in this JSON file; exit 1 on a change")
    args = ap.parse_args(argv)
    from nlsr_fast.demo.determinism import deterministic, is_pinned, numerics

    if not is_pinned():
        print("run this under nlsr_fast.demo.determinism.PINNED_ENV", file=sys.stderr)
        return 2
    state = numerics()
    if not state["paths_pinned"] or state["nlsr_fast_isa"] is None:
        print(f"cannot compare here: CPU paths not pinned (ATen {state['aten_cpu_capability']}, C++ extension "
              f"{state['nlsr_fast_isa']})", file=sys.stderr)
        return 3
    versions = {k: state["versions"][k] for k in VERSIONED}
    if args.check:
        want = json.loads(args.check.read_text())
        recorded = want.pop(VERSIONS_KEY)
        if recorded != versions:
            print(f"cannot compare here: recorded with {recorded}, this is {versions}", file=sys.stderr)
            return 3
    with tempfile.TemporaryDirectory() as tmp, deterministic(0):
        got = outputs(Path(tmp))
    if args.record:
        args.record.write_text(json.dumps(got | {VERSIONS_KEY: versions}, indent=1, sort_keys=True) + "\n")
        return 0
    bad = [f"{name}: {key} {want.get(name, {}).get(key)} -> {got.get(name, {}).get(key)}"
           for name in sorted(set(want) | set(got)) for key in sorted(set(want.get(name, {})) | set(got.get(name, {})))
           if want.get(name, {}).get(key) != got.get(name, {}).get(key)]
    print("\n".join(bad) if bad else f"{len(got)} runs: every output bit for bit as recorded")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
