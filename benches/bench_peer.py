"""Dense mode against the tool users would otherwise reach for: mergekit's `task_arithmetic` merge of the same base,
aligned and fine-tuned checkpoints, side by side on 70B-shaped checkpoints.

    python -m benches.bench_peer --workdir /work/bench_data --layers 2 --repeat 3 --results benches/results/peer_70b

Each phase is a fresh process, timed from spawn to exit with `sync` inside the timed window (`sh -c 'CMD && sync'`:
both tools' writes reach the disk before the clock stops), with the page cache dropped before it; the two tools
alternate `--repeat` times and the table shows medians. Memory as in bench_realign_70b: the kernel's peak RSS of the
process tree, and polled peak anonymous RSS.

- nlsr_fast: `nlsr-fast realign BASE ALIGNED FINETUNED OUT --mode dense --method magnitude --quiet`;
- mergekit (pinned, `--mergekit-version`, installed by this bench into a venv of its own with `pip`, next to the
  pinned torch build; never a dependency of nlsr_fast): `mergekit-yaml CONFIG OUT` with CONFIG
  `merge_method: task_arithmetic`, base BASE, models ALIGNED and FINETUNED at weight 1, `dtype: bfloat16`.

They compute different things (NLSR scores, compares and restores the seven projections of every layer; task
arithmetic adds two deltas to every tensor) over the same I/O: three checkpoints read, one written. Each output is
checked: the nlsr_fast output against the fine-tuned checkpoint (every non-target tensor bit-identical), the mergekit
output for the fine-tuned checkpoint's tensor names and shapes. Inputs come from benches/make_checkpoint.py, as in
bench_realign_70b (free disk is checked first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benches/bench_peer.py` as well as `-m benches.bench_peer`
    sys.path.insert(0, str(REPO))

from benches import bench_realign_70b as b70  # noqa: E402
from benches import make_checkpoint as mc  # noqa: E402

GB = 1e9
MERGEKIT_VERSION = "0.1.5"
TOOLS = ("nlsr_fast", "mergekit")


def mergekit_venv(folder: Path, version: str) -> Path:
    """A venv with torch (the version this process runs) and mergekit==version; the path of `mergekit-yaml`."""
    exe = folder / "bin" / "mergekit-yaml"
    stamp = folder / "mergekit-version.txt"
    if exe.is_file() and stamp.is_file() and stamp.read_text().strip() == version:
        return exe
    import torch

    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # its own dependencies, not ours
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, env=env)
    subprocess.run([*pip, f"mergekit=={version}"], check=True, env=env)
    stamp.write_text(version + "\n")
    return exe


def mergekit_config(path: Path, inputs: dict[str, Path]) -> Path:
    """task_arithmetic of the aligned and fine-tuned checkpoints on the base, in bf16 (JSON is valid YAML)."""
    config = {"merge_method": "task_arithmetic", "base_model": str(inputs["base"]), "dtype": "bfloat16",
              "models": [{"model": str(inputs[k]), "parameters": {"weight": 1.0}} for k in ("aligned", "finetuned")]}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def synced(cmd: Sequence[str]) -> list[str]:
    """`cmd`, then `sync`, as one process tree: the clock stops when the written data is on the disk."""
    return ["sh", "-c", " ".join(f"'{c}'" for c in cmd) + " && sync"]


def tool_cmd(tool: str, inputs: dict[str, Path], out: Path, mergekit: Path | None, config: Path | None) -> list[str]:
    if tool == "nlsr_fast":
        return synced(b70.realign_cmd("dense", inputs["base"], inputs["aligned"], inputs["finetuned"], out))
    assert mergekit is not None and config is not None
    return synced([str(mergekit), str(config), str(out)])


def check_mergekit_output(finetuned: Path, out: Path) -> dict[str, Any]:
    """The merged checkpoint holds the fine-tuned checkpoint's tensors, with their shapes."""
    from nlsr_fast.io import CheckpointReader

    with CheckpointReader(finetuned) as ft, CheckpointReader(out) as got:
        missing = [k for k in ft.keys() if k not in got.keys()]
        shapes = [k for k in ft.keys() if k in got.keys() and tuple(got.shape(k)) != tuple(ft.shape(k))]
    return {"ok": not missing and not shapes, "missing": missing[:5], "shape_mismatch": shapes[:5]}


def run_depth(layers: int, args: argparse.Namespace, mergekit: Path, env: dict[str, str]) -> dict[str, Any]:
    shape = dataclasses.replace(mc.SHAPES[args.shape], layers=layers, vocab=args.vocab)
    inputs = b70.dense_inputs(args.workdir, shape, args.shard_gb)
    scratch = args.workdir / "peer_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    config = mergekit_config(scratch / f"task_arithmetic_L{layers}.yaml", inputs)
    drop = [inputs["base"], inputs["aligned"], inputs["finetuned"]]
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    cache = ""
    for i in range(args.repeat):
        for tool in TOOLS if i % 2 == 0 else reversed(TOOLS):  # alternate which goes first
            out = scratch / f"{tool}_L{layers}_out"
            shutil.rmtree(out, ignore_errors=True)
            cache = b70.drop_page_cache(drop, env)
            print(f"  [{layers} layers] {tool} {i + 1}/{args.repeat} ...", flush=True)
            log = scratch / f"{tool}_L{layers}_{i}.log"
            r = b70.measure(tool_cmd(tool, inputs, out, mergekit, config), env=env, cwd=REPO, log=log)
            r["log_tail"] = log.read_text(errors="replace")[-3000:]
            if r["rc"] != 0:
                raise RuntimeError(f"{tool} failed (exit {r['rc']}):\n{r['log_tail']}")
            if tool == "nlsr_fast":
                report = json.loads((out / "report.json").read_text())
                r["check"] = b70.check_output("dense", inputs["finetuned"], out, report)
            else:
                r["check"] = check_mergekit_output(inputs["finetuned"], out)
            r["output_bytes"] = b70._dir_bytes(out)
            print(f"    {r['seconds']:.2f} s, cpu {r['cpu_seconds']:.1f} s, peak RSS {r['peak_rss'] / GB:.2f} GB "
                  f"(anon {r['peak_anon'] / GB:.2f}), output check {'ok' if r['check']['ok'] else 'FAILED'}",
                  flush=True)
            runs[tool].append(r)
            shutil.rmtree(out, ignore_errors=True)
    res: dict[str, Any] = {"layers": layers, "page_cache": cache, "runs": runs,
                           "inputs_bytes": sum(b70._dir_bytes(p) for p in drop)}
    for tool in TOOLS:
        res[tool] = {k: b70._median(runs[tool], k) for k in ("seconds", "cpu_seconds", "peak_rss", "peak_anon")}
    res["ratio"] = res["nlsr_fast"]["seconds"] / res["mergekit"]["seconds"]
    res["ratios"] = [n["seconds"] / m["seconds"] for n, m in zip(runs["nlsr_fast"], runs["mergekit"], strict=True)]
    return res


def format_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Dense mode against mergekit {result['mergekit_version']} `task_arithmetic`, {result['shape']} shapes",
             "", f"- date: {result['date']}", f"- command: `{result['command']}`", f"- machine: {result['machine']}",
             f"- code: commit {result['git']['commit']}"
             + (f" (library files modified: {result['git']['library_files_modified']})"
                if result["git"]["library_files_modified"] else " (library files unmodified)"),
             f"- page cache before each phase: {result['page_cache']}",
             f"- repeats: {result['repeat']} (the tools alternate; medians); `sync` inside each timed window",
             f"- versions in mergekit's venv: {result['mergekit_env']}", "",
             "| layers | inputs GB | nlsr_fast s | mergekit s | nlsr_fast / mergekit (runs) | nlsr_fast CPU s | "
             "mergekit CPU s | nlsr_fast peak RSS (anon) GB | mergekit peak RSS (anon) GB | outputs checked |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in result["depths"]:
        n, m = d["nlsr_fast"], d["mergekit"]
        ratios = ", ".join(f"{x:.2f}" for x in d["ratios"])
        ok = all(r["check"]["ok"] for t in TOOLS for r in d["runs"][t])
        lines.append(f"| {d['layers']} | {d['inputs_bytes'] / GB:.2f} | {n['seconds']:.1f} | {m['seconds']:.1f} | "
                     f"**{d['ratio']:.2f}x** ({ratios}) | {n['cpu_seconds']:.1f} | {m['cpu_seconds']:.1f} | "
                     f"{n['peak_rss'] / GB:.2f} ({n['peak_anon'] / GB:.2f}) | {m['peak_rss'] / GB:.2f} "
                     f"({m['peak_anon'] / GB:.2f}) | {'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True,
                    help="inputs, outputs and mergekit's venv (outside the repository)")
    ap.add_argument("--layers", default="2,4", help="comma-separated depths (default 2,4)")
    ap.add_argument("--shape", default="llama-3-70b", choices=sorted(mc.SHAPES))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mergekit-version", default=MERGEKIT_VERSION)
    ap.add_argument("--results", help="write PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    mergekit = mergekit_venv(args.workdir / "mergekit_venv", args.mergekit_version)
    freeze = subprocess.run([str(mergekit.parent / "python"), "-m", "pip", "freeze"], capture_output=True, text=True)
    pins = {line.split("==")[0]: line.split("==")[1] for line in freeze.stdout.splitlines() if "==" in line}
    depths = []
    for layers in (int(x) for x in args.layers.split(",") if x):
        shape = dataclasses.replace(mc.SHAPES[args.shape], layers=layers, vocab=args.vocab)
        ok, why = b70._check_dense_disk(args.workdir, shape, args.shard_gb)
        if not ok:
            print(f"skipping {layers} layers: {why}", file=sys.stderr)
            continue
        depths.append(run_depth(layers, args, mergekit, env))
    import platform

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "git": b70._git_state(),
              "shape": args.shape, "repeat": args.repeat, "mergekit_version": args.mergekit_version,
              "mergekit_env": {k: pins.get(k) for k in ("mergekit", "torch", "transformers", "safetensors")},
              "page_cache": depths[0]["page_cache"] if depths else "", "depths": depths}
    text = format_markdown(result)
    print(text)
    if args.results:
        Path(args.results + ".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        Path(args.results + ".md").write_text(text)
    return 0 if depths else 2


if __name__ == "__main__":
    raise SystemExit(main())


def test_peer_config_and_synced_command(tmp_path: Path) -> None:
    """The machinery without mergekit (CI has none): the merge config, and `sync` run only after a command that
    succeeded, in the same timed process tree."""
    inputs = {k: tmp_path / k for k in ("base", "aligned", "finetuned")}
    config = json.loads(mergekit_config(tmp_path / "c.yaml", inputs).read_text())
    assert config == {"merge_method": "task_arithmetic", "base_model": str(inputs["base"]), "dtype": "bfloat16",
                      "models": [{"model": str(inputs["aligned"]), "parameters": {"weight": 1.0}},
                                 {"model": str(inputs["finetuned"]), "parameters": {"weight": 1.0}}]}
    marker = tmp_path / "ran sync"
    ok = b70.measure(["sh", "-c", synced(["true"])[2] + f" && touch '{marker}'"])
    assert ok["rc"] == 0 and marker.exists()
    failed = b70.measure(synced(["false"]))
    assert failed["rc"] == 1
