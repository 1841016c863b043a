"""The other defences' whole `nlsr-fast realign` process at Llama-3-70B dense shapes, against `magnitude` in the same
run.

Inputs: 70B-shaped full checkpoints of 2 decoder layers (benches/make_checkpoint.py: base and fine-tuned, bf16,
vocabulary 32000, 5 GB shards) and a 70B-shaped aligned LoRA adapter on them (benches/make_70b_adapter.py, r = 128,
bf16), which dense mode merges on the fly. Every method reads the same three inputs: `nlsr-fast realign BASE ALIGNED
FINETUNED OUT --mode dense --method M --quiet` for M in magnitude, resta, safelora (its V is the adapter's rank-r
change), each a fresh process timed from spawn to exit with the page cache of the inputs dropped before it
(bench_realign_70b.drop_page_cache), the methods alternating for --repeat rounds; medians. Memory is the child's
peak RSS (ru_maxrss) and the largest anonymous RSS seen (bench_realign_70b.measure).

Bars (issue 16): resta at most 1.1x magnitude's time, safelora with a low-rank V at most 1.5x.

    python -m benches.bench_defences_70b --results benches/results/defences_70b --repeat 3
    pytest benches/bench_defences_70b.py --benchmark-disable      # the machinery on tiny shapes

This file imports nothing from nlsr_fast: the library is run as a command, like a user runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benches import make_checkpoint as mc  # noqa: E402
from benches.bench_realign_70b import GB, _dir_bytes, _git_state, drop_page_cache, measure, nlsr_fast_cmd  # noqa: E402
from benches.make_70b_adapter import make_70b_adapters  # noqa: E402

METHODS = ("magnitude", "resta", "safelora")
BARS = {"resta": 1.1, "safelora": 1.5}  # at most this times magnitude's median time


def inputs(workdir: Path, shape: mc.Shape, rank: int, shard_gb: float) -> dict[str, Path]:
    """Base and fine-tuned checkpoints of `shape` and an aligned adapter of rank `rank` on them (cached)."""
    root = workdir / f"defences_h{shape.hidden}_L{shape.layers}_v{shape.vocab}"
    done = root / "make_checkpoint.json"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        mc.make_checkpoints(root, shape, kinds=("base", "finetuned"), shard_bytes=int(shard_gb * 1e9),
                            tokenizer=True, verbose=True)
    geometry = {"hidden": shape.hidden, "intermediate": shape.intermediate, "heads": shape.heads,
                "kv_heads": shape.kv_heads, "head_dim": shape.head_dim}
    adapter = make_70b_adapters(shape.layers, rank=rank, workdir=root, geometry=geometry, kinds=("aligned",))
    return {"base": root / "base", "aligned": adapter["aligned"], "finetuned": root / "finetuned"}


def realign_cmd(method: str, ins: dict[str, Path], out: Path) -> list[str]:
    return [*nlsr_fast_cmd(), "realign", str(ins["base"]), str(ins["aligned"]), str(ins["finetuned"]), str(out),
            "--mode", "dense", "--method", method, "--quiet"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shape = dataclasses.replace(mc.SHAPES[args.shape], layers=args.layers, vocab=args.vocab)
    free = shutil.disk_usage(workdir).free
    need = 3 * mc.checkpoint_bytes(shape, mc._DTYPES["bfloat16"], int(args.shard_gb * 1e9))
    if free < need:
        raise SystemExit(f"{workdir}: {free / GB:.1f} GB free, the bench needs about {need / GB:.1f} GB")
    ins = inputs(workdir, shape, args.rank, args.shard_gb)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    scratch = workdir / "defences_out"
    scratch.mkdir(exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    cache = ""
    try:
        for i in range(args.repeat):
            for method in args.methods:
                out = scratch / method
                shutil.rmtree(out, ignore_errors=True)
                cache = "kept (--warm)" if args.warm else drop_page_cache(list(ins.values()), env)
                log = scratch / f"{method}_{i}.log"
                r = measure(realign_cmd(method, ins, out), env=env, cwd=REPO, log=log)
                if r["rc"] != 0:
                    raise RuntimeError(f"{method} failed (exit {r['rc']}): {log.read_text()[-3000:]}")
                report = json.loads((out / "report.json").read_text())
                r.update(output_bytes=_dir_bytes(out), restored=report["counts"]["restored"],
                         modules=report["counts"]["modules"], timings=report.get("timings"))
                print(f"  {method} {i + 1}/{args.repeat}: {r['seconds']:.2f} s, cpu {r['cpu_seconds']:.1f} s, peak RSS "
                      f"{r['peak_rss'] / GB:.2f} GB (anon {r['peak_anon'] / GB:.2f}), {r['restored']} of "
                      f"{r['modules']} modules repaired", flush=True)
                runs[method].append(r)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep_data:
            shutil.rmtree(ins["base"].parent, ignore_errors=True)
    medians = {m: {k: float(statistics.median(r[k] for r in rs)) for k in ("seconds", "cpu_seconds", "peak_rss",
                                                                              "peak_anon")}
               for m, rs in runs.items()}
    base_s = medians["magnitude"]["seconds"] if "magnitude" in medians else None
    ratios = {m: v["seconds"] / base_s for m, v in medians.items()} if base_s else {}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benches.bench_defences_70b " + " ".join(sys.argv[1:]),
        "config": {"shape": args.shape, "layers": args.layers, "vocab": args.vocab, "rank": args.rank,
                   "repeat": args.repeat, "methods": list(args.methods)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "git": _git_state(), "page_cache": cache, "runs": runs, "medians": medians, "ratios": ratios,
        "bars": {m: {"bar": b, "ratio": ratios.get(m), "met": ratios.get(m) is not None and ratios[m] <= b}
                 for m, b in BARS.items() if m in ratios},
    }


def format_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# Defences at {cfg['shape']} dense shapes, {cfg['layers']} layers ({result['date']})", "",
             f"`{result['command']}` at {result['git'].get('commit', '?')[:12]}; {result['machine']['cpus']} CPUs; "
             f"page cache: {result['page_cache']}; medians of {cfg['repeat']} alternating runs each.", "",
             "| method | time (s) | / magnitude | each run (s) | CPU (s) | peak RSS (GB) | peak anon (GB) |",
             "|---|---|---|---|---|---|---|"]
    for m, med in result["medians"].items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in result["runs"][m])
        ratio = result["ratios"].get(m)
        lines.append(f"| {m} | {med['seconds']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} | {each} | "
                     f"{med['cpu_seconds']:.1f} | {med['peak_rss'] / GB:.2f} | {med['peak_anon'] / GB:.2f} |")
    lines += ["", "Bars: " + "; ".join(f"{m} <= {b['bar']}x magnitude: {b['ratio']:.2f}x "
                                        f"({'met' if b['met'] else 'NOT met'})" for m, b in result["bars"].items())]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--rank", type=int, default=128, help="the aligned adapter's rank (default 128)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--shape", choices=sorted(mc.SHAPES), default="llama-3-70b")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS)
    p.add_argument("--repeat", type=int, default=3, help="rounds of the methods (medians reported)")
    p.add_argument("--workdir", type=Path, default=Path("/work/bench_data") if Path("/work").is_dir()
                   else Path(os.environ.get("TMPDIR", "/tmp")) / "nlsr_bench")
    p.add_argument("--warm", action="store_true", help="keep the page cache (no drop before each run)")
    p.add_argument("--keep-data", action="store_true", help="keep the generated checkpoints and adapter")
    p.add_argument("--results", type=Path, default=None, metavar="PREFIX", help="write PREFIX.md and PREFIX.json")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bench_defences_70b", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    result = run(args)
    md = format_markdown(result)
    print(md)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".md").write_text(md)
        args.results.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def test_defences_bench_machinery_tiny(tmp_path: Path) -> None:
    """Every method runs on tiny shapes, is measured, and the table and bars come out."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--workdir", str(tmp_path), "--shape", "tiny", "--rank", "4", "--vocab", "160",
                         "--shard-gb", "0.0001", "--warm", "--repeat", "1"])
    result = run(args)
    assert set(result["medians"]) == set(METHODS) and result["ratios"]["magnitude"] == 1.0
    for m in METHODS:
        r = result["runs"][m][0]
        assert r["seconds"] > 0 and r["peak_rss"] > 0 and r["modules"] == 14
        assert r["restored"] == {"magnitude": r["restored"], "resta": 14, "safelora": 10}[m]  # adaptive for magnitude
    md = format_markdown(result)
    assert "| resta |" in md and "Bars: resta <= 1.1x magnitude" in md
    assert not (tmp_path / "defences_out").exists()


if __name__ == "__main__":
    raise SystemExit(main())
