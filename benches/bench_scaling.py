"""Whole-process time and peak RSS of `nlsr-fast realign` against depth, with the I/O floor and mergekit in the same
runs, and the line through them extrapolated to 80 layers.

- dense (`--dense-layers`, default 1,2,4,8; 70B width, vocab 32000): per depth the I/O floor of
  bench_realign_70b, `nlsr-fast realign ... --mode dense --method magnitude` and mergekit's `task_arithmetic` of
  bench_peer (pinned, in its own venv), on the same checkpoints from benches/make_checkpoint.py;
- LoRA (`--lora-layers`, default 10,20,40,80; r = 128): per depth the floor and `nlsr-fast realign ... --method
  random` on adapters from benches/make_70b_adapter.py (module i's factors depend only on the seed and i, so the
  L-layer pair is the first L layers of the 80-layer one) over a sparse base.

Every phase is a fresh process with `sync` inside its timed window (`sh -c 'CMD && sync'`), the page cache of
every input dropped before it; the phases of a depth rotate their order each repeat (floor, nlsr_fast, mergekit;
then nlsr_fast, mergekit, floor; ...) and the tables show medians, every run in the JSON. The measuring, the
commands, the floors, the output checks and the mergekit venv are bench_realign_70b's and bench_peer's functions.

A dense depth whose inputs and one output do not fit the free disk is skipped with a line saying so (the rule of
bench_realign_70b: 3 inputs + 1.1 x one checkpoint for the output + 1 GB headroom), and the results keep the
arithmetic. The slope is a least-squares line over the measured depths below 80, written out and extrapolated to 80.

A run keeps, from an existing PREFIX.json, the mode it did not run (`--fresh` drops it), so each part can be
measured again alone and merged:

    python -m benches.bench_scaling --repeat 3                 # both parts, results to benches/results/scaling.*
    python -m benches.bench_scaling --no-dense --repeat 3      # LoRA again, the dense part kept
    python -m benches.bench_scaling --render benches/results/scaling.json --update-readme
    python -m benches.bench_scaling --check                    # the results file and README agree with the JSON
    pytest benches/bench_scaling.py --benchmark-disable        # the machinery on tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benches/bench_scaling.py` as well as `-m benches.bench_scaling`
    sys.path.insert(0, str(REPO))

from benches import bench_peer as peer  # noqa: E402
from benches import bench_realign_70b as b70  # noqa: E402
from benches import make_checkpoint as mc  # noqa: E402

GB = 1e9
TARGET = 80
DENSE_TOOLS = ("floor", "nlsr_fast", "mergekit")
LORA_TOOLS = ("floor", "nlsr_fast")
KEYS = ("seconds", "cpu_seconds", "peak_rss", "peak_anon", "peak_file", "disk_read", "disk_written")
RSS_SPREAD = 0.15  # peak RSS "flat in depth": the largest within 15% of the smallest (bench_realign_70b's bar)
PEER_RATIO = 0.8  # issue 15 item 2: nlsr_fast at most 0.8x mergekit's time at 2 and 4 layers
README_BEGIN = "<!-- bench_scaling: begin (python -m benches.bench_scaling --render JSON --update-readme) -->"
README_END = "<!-- bench_scaling: end -->"
DEFAULT_RESULTS = REPO / "benches" / "results" / "scaling"


# --- arithmetic -----------------------------------------------------------------------------------------------------


def fit_line(xs: Sequence[float], ys: Sequence[float], target: float = TARGET, unit: str = "s") -> dict[str, Any]:
    """Least squares y = a + b x over the points, and y(target), with the arithmetic written out.

    b = S_xy / S_xx with S_xy = sum (x - mean x)(y - mean y), S_xx = sum (x - mean x)^2; a = mean y - b mean x.
    """
    if len(xs) != len(ys) or len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs two or more distinct depths, got xs={list(xs)} ys={list(ys)}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sxy / sxx
    a = my - b * mx
    value = a + b * target
    pts = ", ".join(f"({x:g}, {y:.2f})" for x, y in zip(xs, ys, strict=True))
    text = (f"least squares over (layers, {unit}) = {pts}: mean layers {mx:.3f}, mean {my:.3f} {unit}; "
            f"S_xy = {sxy:.3f}, S_xx = {sxx:.3f}; slope = S_xy / S_xx = {b:.3f} {unit}/layer; "
            f"intercept = {my:.3f} - {b:.3f} x {mx:.3f} = {a:.3f} {unit}; "
            f"at {target:g} layers: {a:.3f} + {b:.3f} x {target:g} = {value:.2f} {unit}")
    return {"slope": b, "intercept": a, "value": value, "target": target, "points": [list(p) for p in zip(xs, ys,
                                                                                                         strict=True)],
            "arithmetic": text}


def dense_disk(workdir: Path, shape: mc.Shape, shard_gb: float) -> dict[str, Any]:
    """Whether a dense depth fits the free disk (bench_realign_70b's rule), with the numbers behind the answer."""
    fits, msg = b70._check_dense_disk(workdir, shape, shard_gb)
    per = mc.checkpoint_bytes(shape, mc._DTYPES["bfloat16"], int(shard_gb * 1e9))
    return {"fits": fits, "layers": shape.layers, "checkpoint_bytes": per, "free_bytes": mc._free_bytes(workdir),
            "arithmetic": msg}


def rotation(tools: Sequence[str], i: int) -> list[str]:
    """Repeat i runs the tools starting from tools[i % n]: each takes every position once in n repeats."""
    k = i % len(tools)
    return [*tools[k:], *tools[:k]]


# --- running --------------------------------------------------------------------------------------------------------


Phase = Callable[[Path], list[str]]
Check = Callable[[Path, dict[str, Any]], dict[str, Any]]


def run_depth(name: str, layers: int, phases: dict[str, tuple[Phase, Check]], drop: Sequence[Path], scratch: Path,
              repeat: int, env: dict[str, str], warm: bool) -> dict[str, Any]:
    """`repeat` rounds of every phase (order rotating), page cache dropped before each; outputs removed after each."""
    tools = list(phases)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    cache = ""
    for i in range(repeat):
        for tool in rotation(tools, i):
            cmd_of, check = phases[tool]
            out = scratch / f"{name}_{tool}_out"
            shutil.rmtree(out, ignore_errors=True)
            cache = "kept (--warm)" if warm else b70.drop_page_cache(drop, env)
            print(f"  [{name}] {tool} {i + 1}/{repeat} ...", flush=True)
            log = scratch / f"{name}_{tool}_{i}.log"
            r = b70.measure(peer.synced(cmd_of(out)), env=env, cwd=REPO, log=log)
            r["log_tail"] = log.read_text(errors="replace")[-3000:]
            if r["rc"] != 0:
                raise RuntimeError(f"{name} {tool} failed (exit {r['rc']}):\n{r['log_tail']}")
            r["check"] = check(out, r)
            r["output_bytes"] = b70._dir_bytes(out)
            r["position"] = rotation(tools, i).index(tool)
            print(f"    {r['seconds']:.2f} s, cpu {r['cpu_seconds']:.1f} s, peak RSS {r['peak_rss'] / GB:.2f} GB "
                  f"(anon {r['peak_anon'] / GB:.2f}), disk read {r['disk_read'] / GB:.2f} GB written "
                  f"{r['disk_written'] / GB:.2f} GB, check {'ok' if r['check']['ok'] else 'FAILED'}", flush=True)
            runs[tool].append(r)
            shutil.rmtree(out, ignore_errors=True)
    res: dict[str, Any] = {"layers": layers, "page_cache": cache, "runs": runs,
                           "inputs_bytes": sum(b70._dir_bytes(p) for p in drop),
                           "inputs_disk_bytes": sum(b70._disk_bytes(p) for p in drop)}
    for tool in tools:
        res[tool] = {k: b70._median(runs[tool], k) for k in KEYS}
        res[tool]["output_bytes"] = b70._median(runs[tool], "output_bytes")
    res["ratios"] = {}
    for tool, base in (("nlsr_fast", "floor"), ("nlsr_fast", "mergekit"), ("mergekit", "floor")):
        if tool in runs and base in runs:
            res["ratios"][f"{tool}/{base}"] = {
                "median": res[tool]["seconds"] / res[base]["seconds"],
                "runs": [t["seconds"] / b["seconds"] for t, b in zip(runs[tool], runs[base], strict=True)]}
    return res


def _floor_check(out: Path, r: dict[str, Any]) -> dict[str, Any]:
    info = json.loads(r["log_tail"].strip().splitlines()[-1])
    r.update(info)
    return {"ok": info["read"] > 0 and info["written"] > 0}


def _nlsr_check(mode: str, finetuned: Path) -> Check:
    def check(out: Path, r: dict[str, Any]) -> dict[str, Any]:
        rep = out / "report.json"
        return b70.check_output(mode, finetuned, out, json.loads(rep.read_text()) if rep.is_file() else None)

    return check


def dense_phases(inputs: dict[str, Path], mergekit: Path, config: Path) -> dict[str, tuple[Phase, Check]]:
    three = [inputs["base"], inputs["aligned"], inputs["finetuned"]]
    return {
        "floor": (lambda out: b70.floor_cmd("dense", out, three), _floor_check),
        "nlsr_fast": (lambda out: b70.realign_cmd("dense", inputs["base"], inputs["aligned"], inputs["finetuned"], out),
                      _nlsr_check("dense", inputs["finetuned"])),
        "mergekit": (lambda out: [str(mergekit), str(config), str(out)],
                     lambda out, r: peer.check_mergekit_output(inputs["finetuned"], out)),
    }


def lora_phases(inputs: dict[str, Path]) -> dict[str, tuple[Phase, Check]]:
    return {
        "floor": (lambda out: b70.floor_cmd("lora", out, [inputs["aligned"], inputs["finetuned"]]), _floor_check),
        "nlsr_fast": (lambda out: b70.realign_cmd("lora", inputs["base"], inputs["aligned"], inputs["finetuned"], out),
                      _nlsr_check("lora", inputs["finetuned"])),
    }


def _meta(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benches.bench_scaling " + " ".join(argv),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "loadavg_start": list(os.getloadavg()), "git": b70._git_state(), "repeat": args.repeat,
            "shape": args.shape, "notes": list(args.note)}


def _depths(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def run_dense(args: argparse.Namespace, argv: Sequence[str], env: dict[str, str], scratch: Path,
              save: Callable[[], None], section: dict[str, Any]) -> None:
    workdir = Path(args.workdir)
    section.update(meta=_meta(args, argv), depths={}, skipped={})
    if args.mergekit_exe:
        mergekit = Path(args.mergekit_exe)
        section["meta"]["mergekit_env"] = {"mergekit": f"{mergekit} (--mergekit-exe)"}
    else:
        mergekit = peer.mergekit_venv(workdir / "mergekit_venv", args.mergekit_version)
        freeze = subprocess.run([str(mergekit.parent / "python"), "-m", "pip", "freeze"], capture_output=True,
                                text=True)
        pins = dict(line.split("==", 1) for line in freeze.stdout.splitlines() if "==" in line)
        section["meta"]["mergekit_env"] = {k: pins.get(k) for k in ("mergekit", "torch", "transformers",
                                                                     "safetensors")}
    for layers in _depths(args.dense_layers):
        shape = dataclasses.replace(mc.SHAPES[args.shape], layers=layers, vocab=args.vocab)
        disk = dense_disk(workdir, shape, args.shard_gb)
        if not disk["fits"]:
            print(f"dense {layers} layers SKIPPED, does not fit the disk: {disk['arithmetic']}", flush=True)
            section["skipped"][str(layers)] = disk
            save()
            continue
        print(f"dense {layers} layers: {disk['arithmetic']}", flush=True)
        root = workdir / f"dense_h{shape.hidden}_L{layers}_v{shape.vocab}"
        existed = root.exists()
        inputs = b70.dense_inputs(workdir, shape, args.shard_gb)
        try:
            config = peer.mergekit_config(scratch / f"task_arithmetic_L{layers}.yaml", inputs)
            drop = [inputs["base"], inputs["aligned"], inputs["finetuned"]]
            res = run_depth(f"dense{layers}", layers, dense_phases(inputs, mergekit, config), drop, scratch,
                            args.repeat, env, args.warm)
            res["checkpoint_bytes"] = disk["checkpoint_bytes"]
            section["depths"][str(layers)] = res
            save()
        finally:
            if not args.keep_data and not existed:
                shutil.rmtree(root, ignore_errors=True)
    section["meta"]["loadavg_end"] = list(os.getloadavg())


def run_lora(args: argparse.Namespace, argv: Sequence[str], env: dict[str, str], scratch: Path,
             save: Callable[[], None], section: dict[str, Any]) -> None:
    workdir = Path(args.workdir)
    section.update(meta=_meta(args, argv), depths={})
    section["meta"]["rank"] = args.rank
    shape0 = mc.SHAPES[args.shape]
    geometry = {"hidden": shape0.hidden, "intermediate": shape0.intermediate, "heads": shape0.heads,
                "kv_heads": shape0.kv_heads, "head_dim": shape0.head_dim}
    for layers in _depths(args.lora_layers):
        tag = "llama3_70b" if args.shape == "llama-3-70b" else "llama_h{hidden}_i{intermediate}".format(**geometry)
        made = [workdir / f"{tag}_L{layers}_r{args.rank}_s0", workdir / f"sparse_base_h{shape0.hidden}_L{layers}"]
        new = [p for p in made if not p.exists()]
        print(f"LoRA {layers} layers, r={args.rank}", flush=True)
        inputs = b70.lora_inputs(workdir, layers, args.rank, geometry, dataclasses.replace(shape0, layers=layers))
        try:
            drop = [inputs["aligned"], inputs["finetuned"], inputs["base"]]
            section["depths"][str(layers)] = run_depth(f"lora{layers}", layers, lora_phases(inputs), drop, scratch,
                                                       args.repeat, env, args.warm)
            save()
        finally:
            if not args.keep_data:
                for p in new:
                    shutil.rmtree(p, ignore_errors=True)
    section["meta"]["loadavg_end"] = list(os.getloadavg())


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Measure the parts asked for; the other part comes from PREFIX.json unless --fresh."""
    workdir = Path(args.workdir)
    if workdir.resolve().is_relative_to(REPO):
        raise SystemExit(f"--workdir {workdir} lies inside the repository; use a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = Path(args.results)
    old = prefix.with_suffix(".json")
    result: dict[str, Any] = json.loads(old.read_text()) if old.is_file() and not args.fresh else {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    scratch = workdir / "scaling_scratch"
    scratch.mkdir(exist_ok=True)

    def save() -> None:  # what is measured so far (a long run that dies keeps its finished depths)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".partial.json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    try:
        if not args.no_dense and _depths(args.dense_layers):
            result["dense"] = {}
            run_dense(args, argv, env, scratch, save, result["dense"])
        if not args.no_lora and _depths(args.lora_layers):
            result["lora"] = {}
            run_lora(args, argv, env, scratch, save, result["lora"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# --- summary, tables, plot ------------------------------------------------------------------------------------------


def _measured(section: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
    return sorted((int(k), v) for k, v in ((section or {}).get("depths") or {}).items())


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Lines through each tool's time and peak RSS, extrapolated to 80 layers; the bars of issue 15 item 2."""
    out: dict[str, Any] = {}
    for mode, tools in (("dense", DENSE_TOOLS), ("lora", LORA_TOOLS)):
        depths = _measured(result.get(mode))
        below = [(L, d) for L, d in depths if L < TARGET]
        if len(below) < 2:
            continue
        fits: dict[str, Any] = {}
        for tool in tools:
            if not all(tool in d for _, d in below):
                continue
            xs = [float(L) for L, _ in below]
            fits[tool] = {
                "seconds": fit_line(xs, [d[tool]["seconds"] for _, d in below], unit="s"),
                "peak_rss": fit_line(xs, [d[tool]["peak_rss"] / GB for _, d in below], unit="GB"),
            }
            # Peak RSS is bounded by one step (a module and the one read ahead; one shard for the floor and for
            # mergekit's mapped inputs), not by the depth: its slope is shown, its line not extended to 80 layers.
            rss = fits[tool]["peak_rss"]
            (xa, ya), (xb, yb) = rss["points"][-2:]
            rss["last_two_slope"] = (yb - ya) / (xb - xa)
            rss["largest"] = max(y for _, y in rss["points"])
            rss["text"] = (f"least-squares slope {rss['slope']:.3f} GB/layer over "
                           f"{', '.join(f'{x:g}' for x, _ in rss['points'])} layers "
                           f"({rss['arithmetic'].split('; ')[1]}), between the two deepest ({yb:.3f} - {ya:.3f}) / "
                           f"({xb:g} - {xa:g}) = {rss['last_two_slope']:.3f} GB/layer; the largest measured: "
                           f"{rss['largest']:.2f} GB")
            at = dict(depths).get(TARGET)
            if at is not None:
                rss["measured_at_target"] = at[tool]["peak_rss"] / GB
                rss["text"] += f"; measured at {TARGET} layers: {rss['measured_at_target']:.2f} GB"
            if at is not None:  # measured at 80 too: how far the line from the shallower depths lands
                got = at[tool]["seconds"]
                fits[tool]["seconds"]["measured_at_target"] = got
                fits[tool]["seconds"]["error"] = fits[tool]["seconds"]["value"] / got - 1
        if "nlsr_fast" in fits and "floor" in fits:
            fits["ratio_at_target"] = fits["nlsr_fast"]["seconds"]["value"] / fits["floor"]["seconds"]["value"]
        if "nlsr_fast" in fits and "mergekit" in fits:
            fits["peer_ratio_at_target"] = (fits["nlsr_fast"]["seconds"]["value"]
                                            / fits["mergekit"]["seconds"]["value"])
        out[mode] = fits
    dense = dict(_measured(result.get("dense")))
    bars: dict[str, Any] = {}
    for L in (2, 4):
        if L in dense and "mergekit" in dense[L]:
            r = dense[L]["ratios"]["nlsr_fast/mergekit"]["median"]
            bars[f"nlsr_fast/mergekit at {L} layers"] = [r, PEER_RATIO, r <= PEER_RATIO]
    for mode in ("dense", "lora"):
        rss = [d["nlsr_fast"]["peak_rss"] for _, d in _measured(result.get(mode))]
        if len(rss) > 1:
            spread = max(rss) / min(rss) - 1
            bars[f"{mode} nlsr_fast peak RSS spread over depth"] = [spread, RSS_SPREAD, spread <= RSS_SPREAD]
    out["bars"] = bars
    shape = dataclasses.replace(mc.SHAPES[(result.get("dense") or {}).get("meta", {}).get("shape", "llama-3-70b")],
                                layers=TARGET, vocab=32000)
    per = mc.checkpoint_bytes(shape, mc._DTYPES["bfloat16"], int(5e9))
    out["disk_at_target"] = {"checkpoint_bytes": per, "arithmetic": (
        f"{TARGET} layers at vocab 32000: 3 inputs x {per / GB:.2f} GB + one output ~1.1 x {per / GB:.2f} GB "
        f"= {4.1 * per / GB:.1f} GB")}
    return out


def _s(x: float) -> str:
    return f"{x:.1f}"


def _g(x: float) -> str:
    return f"{x / GB:.2f}"


def _runs(xs: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def _meta_lines(name: str, meta: dict[str, Any]) -> list[str]:
    git = meta.get("git", {})
    code = f"commit {git.get('commit', '?')}" + (
        f", library files modified: {', '.join(git['library_files_modified'])}"
        if git.get("library_files_modified") else " (library files unmodified)")
    lines = [f"- {name}: {meta['date']}; `{meta['command']}`; {meta['machine']}; load average "
             f"{meta['loadavg_start'][0]:.1f} at the start, {meta.get('loadavg_end', [float('nan')])[0]:.1f} at the "
             f"end; {code}; repeats: {meta['repeat']} (order rotating; medians)"]
    if meta.get("mergekit_env"):
        lines.append(f"- mergekit's venv: {meta['mergekit_env']}")
    lines += [f"- note ({name}): {n}" for n in meta.get("notes", [])]
    return lines


def format_markdown(result: dict[str, Any], plot: str | None = None) -> str:
    s = summarize(result)
    lines = ["# Whole-process time and peak RSS against depth, Llama-3-70B width", ""]
    for mode in ("dense", "lora"):
        if result.get(mode):
            lines += _meta_lines(mode, result[mode]["meta"])
    caches = {d["page_cache"] for m in ("dense", "lora") for _, d in _measured(result.get(m))}
    lines += [f"- page cache before each phase: {'; '.join(sorted(caches))}",
              "- every phase: a fresh process, `sync` inside its timed window; peak RSS: the kernel's high-water mark "
              "of the process tree (wait4); anon: polled RssAnon", ""]
    dense = _measured(result.get("dense"))
    if dense or (result.get("dense") or {}).get("skipped"):
        lines += ["## Dense (`--mode dense --method magnitude`) against the floor and mergekit `task_arithmetic`", "",
                  "| layers | inputs GB | floor s | nlsr_fast s | mergekit s | nlsr_fast / floor | "
                  "nlsr_fast / mergekit (runs) | peak RSS GB floor | nlsr_fast (anon) | mergekit (anon) | "
                  "outputs checked |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for L, d in dense:
            f, n, m = d["floor"], d["nlsr_fast"], d["mergekit"]
            pr = d["ratios"]["nlsr_fast/mergekit"]
            ok = all(r["check"]["ok"] for t in DENSE_TOOLS for r in d["runs"][t])
            lines.append(f"| {L} | {_g(d['inputs_bytes'])} | {_s(f['seconds'])} | {_s(n['seconds'])} | "
                         f"{_s(m['seconds'])} | {d['ratios']['nlsr_fast/floor']['median']:.2f}x | "
                         f"**{pr['median']:.2f}x** ({_runs(pr['runs'])}) | {_g(f['peak_rss'])} | "
                         f"{_g(n['peak_rss'])} ({_g(n['peak_anon'])}) | {_g(m['peak_rss'])} ({_g(m['peak_anon'])}) | "
                         f"{'yes' if ok else '**NO**'} |")
        for L in sorted(int(k) for k in (result["dense"].get("skipped") or {})):
            lines.append(f"| {L} | skipped: does not fit the disk | | | | | | | | | |")
        lines.append("")
        for L, d in dense:
            runs = "; ".join(f"{t} " + _runs([r["seconds"] for r in d["runs"][t]]) for t in DENSE_TOOLS)
            lines.append(f"- {L} layers, every run (s): {runs}")
        for L, sk in sorted((int(k), v) for k, v in (result["dense"].get("skipped") or {}).items()):
            lines.append(f"- {L} layers skipped: {sk['arithmetic']}")
        lines.append("")
    lora = _measured(result.get("lora"))
    if lora:
        lines += [f"## LoRA (`--method random`, r = {result['lora']['meta'].get('rank', '?')}) against the floor", "",
                  "| layers | adapters GB | floor s | nlsr_fast s | nlsr_fast / floor (runs) | peak RSS GB floor | "
                  "nlsr_fast (anon) | output checked |", "|---|---|---|---|---|---|---|---|"]
        for L, d in lora:
            f, n = d["floor"], d["nlsr_fast"]
            rr = d["ratios"]["nlsr_fast/floor"]
            ok = all(r["check"]["ok"] for t in LORA_TOOLS for r in d["runs"][t])
            adapters = d["inputs_disk_bytes"]  # the sparse base holds headers only
            lines.append(f"| {L} | {_g(adapters)} | {_s(f['seconds'])} | {_s(n['seconds'])} | "
                         f"**{rr['median']:.2f}x** ({_runs(rr['runs'])}) | {_g(f['peak_rss'])} | "
                         f"{_g(n['peak_rss'])} ({_g(n['peak_anon'])}) | {'yes' if ok else '**NO**'} |")
        lines.append("")
    for mode, label in (("dense", "Dense"), ("lora", "LoRA")):
        fits = s.get(mode)
        if not fits:
            continue
        lines += [f"## {label}: the lines, extrapolated to {TARGET} layers", ""]
        for tool in DENSE_TOOLS:
            if tool not in fits:
                continue
            fl = fits[tool]["seconds"]
            extra = ""
            if "measured_at_target" in fl:
                extra = (f" (measured at {TARGET}: {fl['measured_at_target']:.2f} s; the line from the shallower "
                         f"depths is off by {fl['error'] * 100:+.1f}%)")
            lines.append(f"- {tool} seconds: {fl['arithmetic']}{extra}")
            lines.append(f"- {tool} peak RSS: {fits[tool]['peak_rss']['text']}")
        if "ratio_at_target" in fits:
            lines.append(f"- nlsr_fast / floor at {TARGET} layers: {fits['nlsr_fast']['seconds']['value']:.1f} / "
                         f"{fits['floor']['seconds']['value']:.1f} = {fits['ratio_at_target']:.2f}x")
        if "peer_ratio_at_target" in fits:
            lines.append(f"- nlsr_fast / mergekit at {TARGET} layers: {fits['nlsr_fast']['seconds']['value']:.1f} / "
                         f"{fits['mergekit']['seconds']['value']:.1f} = {fits['peer_ratio_at_target']:.2f}x")
        if mode == "dense":
            lines.append(f"- disk for one {TARGET}-layer dense run: {s['disk_at_target']['arithmetic']}")
            lines.append(f"- peak RSS is not extended to {TARGET} layers as a line: nlsr_fast holds one module and the "
                         "one read ahead whatever the depth (the README's 80-layer row gives its largest measured); "
                         "the floor holds one shard (5 GB at most); mergekit's is mostly its mapped inputs, and no "
                         f"{TARGET}-layer figure is claimed for it")
        else:
            lines.append("- peak RSS: nlsr_fast holds one module of each adapter; the floor loads both adapters whole, "
                         "so its peak grows with depth")
        lines.append("")
    if s.get("bars"):
        lines += ["## Bars", "", "| bar | measured | limit | met |", "|---|---|---|---|"]
        for name, (val, lim, ok) in s["bars"].items():
            txt = (f"{val * 100:.1f}% | <= {lim * 100:.0f}%" if "spread" in name else f"{val:.2f}x | <= {lim:.2f}x")
            lines.append(f"| {name} | {txt} | {'yes' if ok else '**no**'} |")
        lines.append("")
    if plot:
        lines += [f"![time and peak RSS against depth]({plot})", ""]
    return "\n".join(lines)


def readme_block(result: dict[str, Any], plot: str = "benches/results/scaling.png") -> str:
    """The README's Big models table and plot (between README_BEGIN and README_END), from the results JSON."""
    s = summarize(result)

    def runs(mode: str) -> str:
        meta = (result.get(mode) or {}).get("meta") or {}
        r = meta.get("repeat", 0)
        how = f"medians of {r} runs" if r > 1 else "one run"
        return f"{'LoRA' if mode == 'lora' else mode} {how} ({meta.get('date', '?')})"

    machine = next((result[m]["meta"]["machine"] for m in ("dense", "lora") if result.get(m)), "")
    cpus = next((part for part in machine.split(", ") if part.endswith("CPUs")), "?")
    lines = [README_BEGIN, "",
             "Wall time and peak RSS of the whole process against depth, the floor and mergekit in the same runs "
             "(`python -m benches.bench_scaling`: each phase a fresh process, page cache dropped before it, `sync` "
             f"inside its timed window; {'; '.join(runs(m) for m in ('dense', 'lora') if result.get(m))}; "
             f"{cpus}):", "", f"![wall time and peak RSS against depth]({plot})", "",
             "| mode | layers | I/O floor s | nlsr_fast s | mergekit s | nlsr_fast / floor | nlsr_fast / mergekit | "
             "peak RSS GB nlsr_fast | mergekit |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in ("dense", "lora"):
        for L, d in _measured(result.get(mode)):
            m = d.get("mergekit")
            pr = d["ratios"].get("nlsr_fast/mergekit")
            peer_txt = f"{pr['median']:.2f}x" if pr else "—"
            lines.append(f"| {mode} | {L} | {_s(d['floor']['seconds'])} | {_s(d['nlsr_fast']['seconds'])} | "
                         f"{_s(m['seconds']) if m else '—'} | {d['ratios']['nlsr_fast/floor']['median']:.2f}x | "
                         f"{peer_txt} | {_g(d['nlsr_fast']['peak_rss'])} | {_g(m['peak_rss']) if m else '—'} |")
        fits = s.get(mode)
        if fits and TARGET not in dict(_measured(result.get(mode))):
            mk = fits.get("mergekit")
            mk_s, mk_r, mk_rss = ((_s(mk["seconds"]["value"]), f"{fits['peer_ratio_at_target']:.2f}x",
                                   "—") if mk else ("—", "—", "—"))
            lines.append(f"| {mode} | {TARGET} (line) | {_s(fits['floor']['seconds']['value'])} | "
                         f"{_s(fits['nlsr_fast']['seconds']['value'])} | {mk_s} | {fits['ratio_at_target']:.2f}x | "
                         f"{mk_r} | ~{fits['nlsr_fast']['peak_rss']['largest']:.2f} | {mk_rss} |")
    lines.append("")
    fits = s.get("dense")
    if fits:
        n, f = fits["nlsr_fast"]["seconds"], fits["floor"]["seconds"]
        lines.append(f"The dense {TARGET}-layer row comes from least-squares lines through the measured depths: "
                     f"nlsr_fast "
                     f"{n['intercept']:.1f} + {n['slope']:.2f} s/layer x {TARGET} = {n['value']:.0f} s, the floor "
                     f"{f['intercept']:.1f} + {f['slope']:.2f} x {TARGET} = {f['value']:.0f} s"
                     + (f", mergekit {fits['mergekit']['seconds']['intercept']:.1f} + "
                        f"{fits['mergekit']['seconds']['slope']:.2f} x {TARGET} = "
                        f"{fits['mergekit']['seconds']['value']:.0f} s" if "mergekit" in fits else "") + ". "
                     "nlsr_fast's peak RSS is not a line in depth (one module and the one read ahead): the row gives "
                     "the largest measured; mergekit's is not extrapolated"
                     + (" (its anonymous part went " + " → ".join(f"{d['mergekit']['peak_anon'] / GB:.2f}"
                                                                  for _, d in _measured(result['dense']))
                        + " GB over " + ", ".join(str(L) for L, _ in _measured(result['dense'])) + " layers)"
                        if "mergekit" in fits else "") + ".")
        skipped = sorted(int(k) for k in (result["dense"].get("skipped") or {}))
        if skipped:
            sk = result["dense"]["skipped"][str(skipped[0])]
            per = sk["checkpoint_bytes"] / GB
            need = 4.1 * per + mc.HEADROOM / GB
            lines.append(f"Dense at {', '.join(map(str, skipped))} layers did not fit this machine's disk: 3 inputs "
                         f"x {per:.2f} GB + one output ~1.1 x {per:.2f} GB + {mc.HEADROOM / GB:.0f} GB headroom = "
                         f"{need:.1f} GB, {sk['free_bytes'] / GB:.1f} GB free.")
    lora_fit = (s.get("lora") or {}).get("nlsr_fast", {}).get("seconds")
    if lora_fit:
        depths = ", ".join(f"{p[0]:g}" for p in lora_fit["points"])
        lines.append(f"LoRA nlsr_fast's line through {depths} layers: {lora_fit['intercept']:.1f} + "
                     f"{lora_fit['slope']:.3f} s/layer x {TARGET} = {lora_fit['value']:.1f} s"
                     + (f", measured {lora_fit['measured_at_target']:.1f} s ({lora_fit['error'] * 100:+.1f}%)"
                        if "measured_at_target" in lora_fit else "") + ".")
    lines += ["Every run, the arithmetic and the machine: [benches/results/scaling.md](benches/results/scaling.md).",
              "", README_END]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Wall time and peak RSS against depth: dense (with mergekit) and LoRA, floor in both, least-squares lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(result)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    style = {"floor": ("tab:gray", "s"), "nlsr_fast": ("tab:blue", "o"), "mergekit": ("tab:orange", "^")}
    for row, (mode, label) in enumerate((("dense", "dense, 70B width"), ("lora", "LoRA r = 128, 70B width"))):
        depths = _measured(result.get(mode))
        for col, (key, unit, scale) in enumerate((("seconds", "wall time, s", 1.0), ("peak_rss", "peak RSS, GB", GB))):
            ax = axes[row][col]
            for tool in DENSE_TOOLS:
                pts = [(L, d[tool][key] / scale) for L, d in depths if tool in d]
                if not pts:
                    continue
                color, marker = style[tool]
                # Time: points and the least-squares line; peak RSS (not a line in depth): points joined.
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                        linestyle="none" if key == "seconds" else ":", label=tool)
                fl = (s.get(mode) or {}).get(tool, {}).get(key)
                if fl and key == "seconds":
                    xs = [min(p[0] for p in pts), max(p[0] for p in pts)]
                    ax.plot(xs, [fl["intercept"] + fl["slope"] * x for x in xs], color=color, linewidth=1,
                            label=f"{tool} least squares: {fl['slope']:.2f} s/layer")
            ax.set_xlabel("decoder layers")
            ax.set_ylabel(unit)
            ax.set_title(f"{label}: {unit.split(',')[0]}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if depths:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- output ---------------------------------------------------------------------------------------------------------


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme} has no '{README_BEGIN}' ... '{README_END}' block to replace")
    readme.write_text(text[:i] + block + text[j + len(README_END):], encoding="utf-8")


def check(prefix: Path, readme: Path) -> list[str]:
    """The results file's and the README's tables against the ones the results JSON gives."""
    result = json.loads(prefix.with_suffix(".json").read_text())
    problems = []
    if format_markdown(result, prefix.with_suffix(".png").name) != prefix.with_suffix(".md").read_text():
        problems.append(f"{prefix.with_suffix('.md')} is not what {prefix.with_suffix('.json')} renders to")
    if readme_block(result) not in readme.read_text(encoding="utf-8"):
        problems.append(f"{readme}: its scaling table is not what {prefix.with_suffix('.json')} renders to")
    return problems


def write(result: dict[str, Any], prefix: Path, readme: Path | None) -> str:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, prefix.with_suffix(".png"))
    md = format_markdown(result, prefix.with_suffix(".png").name)
    prefix.with_suffix(".md").write_text(md)
    prefix.with_suffix(".partial.json").unlink(missing_ok=True)
    if readme is not None:
        update_readme(readme, readme_block(result))
    return md


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("/work/bench_data"),
                   help="inputs, outputs and mergekit's venv (outside the repository)")
    p.add_argument("--dense-layers", default="1,2,4,8", help="comma-separated dense depths ('' skips)")
    p.add_argument("--lora-layers", default="10,20,40,80", help="comma-separated LoRA depths ('' skips)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense part (kept from PREFIX.json)")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA part (kept from PREFIX.json)")
    p.add_argument("--fresh", action="store_true", help="do not keep the other part from PREFIX.json")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--shape", default="llama-3-70b", choices=sorted(mc.SHAPES))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mergekit-version", default=peer.MERGEKIT_VERSION)
    p.add_argument("--mergekit-exe", default=None, help="run this `mergekit-yaml` instead of the pinned venv's")
    p.add_argument("--warm", action="store_true", help="keep the page cache (no drop before each phase)")
    p.add_argument("--keep-data", action="store_true", help="keep the checkpoints and adapters this run made")
    p.add_argument("--note", action="append", default=[], help="a line added to the part's notes (repeatable)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, metavar="PREFIX",
                   help="PREFIX.json / .md / .png (default benches/results/scaling)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="run nothing: render JSON to PREFIX.*")
    p.add_argument("--update-readme", action="store_true", help="also rewrite the README's scaling block")
    p.add_argument("--check", action="store_true", help="PREFIX.md and the README against PREFIX.json (exit 1)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benches.bench_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    prefix = Path(args.results)
    readme = REPO / "README.md" if args.update_readme else None
    if args.check:
        problems = check(prefix, REPO / "README.md")
        print("\n".join(problems) or "the results file and the README agree with the JSON")
        return 1 if problems else 0
    if args.render is not None:
        result = json.loads(Path(args.render).read_text())
    else:
        result = run(args, argv)
    print(write(result, prefix, readme))
    checks = [r["check"]["ok"] for m in ("dense", "lora") for _, d in _measured(result.get(m))
              for runs in d["runs"].values() for r in runs]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())


# --- tests (CI: `pytest benches --benchmark-disable`) ---------------------------------------------------------------


def test_fit_line_arithmetic() -> None:
    """Exact on a line; the least-squares slope on three points; the text carries the numbers it computed."""
    f = fit_line([1, 2, 4], [5.0, 7.0, 11.0])
    assert abs(f["slope"] - 2) < 1e-12 and abs(f["intercept"] - 3) < 1e-12 and abs(f["value"] - 163) < 1e-9
    assert "= 163.00 s" in f["arithmetic"] and "slope = S_xy / S_xx = 2.000 s/layer" in f["arithmetic"]
    # (1, 10), (2, 14), (4, 20): mean x 7/3, mean y 44/3; deviations (-4, -1, 5)/3 and (-14, -2, 16)/3;
    # S_xy = (56 + 2 + 80)/9 = 46/3, S_xx = (16 + 1 + 25)/9 = 14/3; slope 23/7; intercept 44/3 - 23/7 x 7/3 = 7
    g = fit_line([1, 2, 4], [10.0, 14.0, 20.0])
    slope = 23 / 7
    assert abs(g["slope"] - slope) < 1e-12 and abs(g["intercept"] - 7) < 1e-12
    assert "S_xy = 15.333, S_xx = 4.667" in g["arithmetic"]
    assert abs(g["intercept"] - (44 / 3 - slope * 7 / 3)) < 1e-12
    assert abs(g["value"] - (44 / 3 - slope * 7 / 3 + 80 * slope)) < 1e-9
    import pytest

    with pytest.raises(ValueError, match="two or more distinct"):
        fit_line([2, 2], [1.0, 2.0])


def test_rotation_puts_each_tool_in_each_position() -> None:
    orders = [rotation(DENSE_TOOLS, i) for i in range(3)]
    assert orders[0] == ["floor", "nlsr_fast", "mergekit"] and orders[1] == ["nlsr_fast", "mergekit", "floor"]
    for pos in range(3):
        assert {o[pos] for o in orders} == set(DENSE_TOOLS)


def test_dense_disk_rule(tmp_path: Path, monkeypatch: Any) -> None:
    """3 inputs + 1.1 x one checkpoint + 1 GB headroom: fits at exactly that much free, not one byte less; 8 layers
    at 70B width (3 x 14.74 GB in + ~16.2 GB out) does not fit 49 GB."""
    shape = dataclasses.replace(mc.SHAPES["llama-3-70b"], layers=8, vocab=32000)
    per = mc.checkpoint_bytes(shape, mc._DTYPES["bfloat16"], int(5e9))
    assert abs(per / GB - 14.74) < 0.01
    need = 3 * per + int(1.1 * per) + mc.HEADROOM
    for free, fits in ((need, True), (need - 1, False), (49 * 10**9, False)):
        monkeypatch.setattr(mc, "_free_bytes", lambda _p, free=free: free)
        d = dense_disk(tmp_path, shape, 5.0)
        assert d["fits"] is fits and d["checkpoint_bytes"] == per and d["free_bytes"] == free
        assert f"need {need / GB:.2f} GB" in d["arithmetic"]
    two = dataclasses.replace(shape, layers=2)
    monkeypatch.setattr(mc, "_free_bytes", lambda _p: 49 * 10**9)
    assert dense_disk(tmp_path, two, 5.0)["fits"]


def test_scaling_bench_machinery_tiny(tmp_path: Path) -> None:
    """Both parts end to end on tiny shapes (a stand-in `mergekit-yaml` that copies the fine-tuned checkpoint: CI has
    no mergekit), a LoRA-only rerun merged into the stored JSON, the lines, the tables and the README block."""
    fake = tmp_path / "mergekit-yaml"
    fake.write_text(f"#!{sys.executable}\nimport json, shutil, sys\n"
                    "cfg = json.load(open(sys.argv[1]))\n"
                    "shutil.copytree(cfg['models'][1]['model'], sys.argv[2])\n")
    fake.chmod(0o755)
    prefix = tmp_path / "res" / "scaling"
    common = ["--workdir", str(tmp_path / "work"), "--shape", "tiny", "--rank", "4", "--vocab", "160",
              "--shard-gb", "0.0001", "--warm", "--repeat", "1", "--results", str(prefix)]
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = [*common, "--dense-layers", "1,2,3", "--lora-layers", "1,2", "--mergekit-exe", str(fake)]
    result = run(p.parse_args(argv), argv)
    write(result, prefix, None)
    assert sorted(result["dense"]["depths"]) == ["1", "2", "3"] and sorted(result["lora"]["depths"]) == ["1", "2"]
    for mode, tools in (("dense", DENSE_TOOLS), ("lora", LORA_TOOLS)):
        for d in result[mode]["depths"].values():
            for tool in tools:
                (r,) = d["runs"][tool]
                assert r["check"]["ok"], (mode, tool, r["check"])
                assert r["seconds"] > 0 and r["peak_rss"] > 0 and r["cmd"][:2] == ["sh", "-c"]
                assert r["cmd"][2].endswith(" && sync")
            ratio = d["ratios"]["nlsr_fast/floor"]
            assert ratio["runs"] == [d["nlsr_fast"]["seconds"] / d["floor"]["seconds"]] == [ratio["median"]]
    s = summarize(result)
    xs = [1.0, 2.0, 3.0]
    ys = [result["dense"]["depths"][str(int(x))]["nlsr_fast"]["seconds"] for x in xs]
    assert s["dense"]["nlsr_fast"]["seconds"]["value"] == fit_line(xs, ys)["value"]
    assert s["dense"]["peer_ratio_at_target"] == (s["dense"]["nlsr_fast"]["seconds"]["value"]
                                                  / s["dense"]["mergekit"]["seconds"]["value"])
    md = prefix.with_suffix(".md").read_text()
    assert "| 3 |" in md and "nlsr_fast seconds: least squares over (layers, s) = (1, " in md
    assert prefix.with_suffix(".png").stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Big models\n\n{README_BEGIN}\nold\n{README_END}\n\n## Results\n")
    update_readme(readme, readme_block(result))
    assert check(prefix, readme) == [] and readme.read_text().endswith("\n\n## Results\n")
    assert "| dense | 80 (line) |" in readme.read_text()
    # The LoRA part alone again: the dense part is kept from the JSON, the LoRA part replaced.
    argv = [*common, "--no-dense", "--lora-layers", "2"]
    again = run(p.parse_args(argv), argv)
    assert again["dense"] == json.loads(json.dumps(result["dense"], default=str))
    assert sorted(again["lora"]["depths"]) == ["2"] and "--no-dense" in again["lora"]["meta"]["command"]
    assert not any((tmp_path / "work").glob("dense_*")) and not any((tmp_path / "work").glob("llama*"))


def test_stored_scaling_results_match_readme() -> None:
    """The committed results file and the README's Big models table are what the committed JSON renders to."""
    import pytest

    if not DEFAULT_RESULTS.with_suffix(".json").is_file():
        pytest.skip("no stored scaling results")
    assert check(DEFAULT_RESULTS, REPO / "README.md") == []
