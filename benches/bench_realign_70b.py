"""The whole `nlsr-fast realign` process at Llama-3-70B shapes, against an I/O floor measured in the same run.

Two benches, each a sequence of phases; every phase is a fresh process, timed from spawn to exit, with the page
cache of every input dropped before it (`echo 3 > /proc/sys/vm/drop_caches` when permitted, otherwise `sync` +
`posix_fadvise(POSIX_FADV_DONTNEED)` on every input file, which needs no root; the output says which):

- LoRA mode: PEFT adapters at 70B shapes (80 layers x 7 modules, r=128, bf16, 3.31 GB each; made by
  benches/make_70b_adapter.py) on a *sparse* 70B base (benches/make_checkpoint.py --sparse: real headers, no
  data: `--method random` reads only the base's shapes), `nlsr-fast realign BASE ALIGNED FINETUNED OUT --method
  random --quiet`. Floor: a plain torch + safetensors process that reads the aligned and fine-tuned adapters once
  (every page) and writes one adapter (`save_file` + fsync).
  Bars: time <= 1.25x the floor, peak RSS <= 6 GB, peak anonymous RSS <= 2 GB.
- Dense mode: full checkpoints from `benches/make_checkpoint.py --shape llama-3-70b --vocab 32000` at 2 and 4
  layers, `nlsr-fast realign BASE ALIGNED FINETUNED OUT --mode dense --method magnitude --quiet`. Floor: read the
  three checkpoints once (shard by shard, every page) and write one checkpoint of the fine-tuned's size.
  Bars: time <= 1.5x the floor at each depth, peak RSS < 8 GB at both depths and within 15% of each other.

Memory of a phase: peak RSS is the kernel's own high-water mark of the child (ru_maxrss from wait4, exact); peak
anonymous and file-backed RSS are the largest RssAnon / RssFile seen by polling /proc/<pid>/status every 10 ms,
summed over the child's process tree (a spike shorter than that can be missed). Disk traffic is ru_inblock /
ru_oublock of the child (bytes that really went to or came from the block device: a near-zero read count means
the cache drop did not work).

With --repeat N, floor and realign alternate N times and the table shows medians (and every run in the JSON).
The dense results are extrapolated to 80 layers: t(80) = t(2) + 78 x (t(4) - t(2)) / 2, the same for the floor
and for the bytes on disk.

    python -m benches.bench_realign_70b --workdir /work/bench_data --results benches/results/realign_70b
    python -m benches.bench_realign_70b --no-dense               # LoRA only (6.6 GB of adapters)
    python -m nlsr_fast.bench realign                            # LoRA only, 2 layers
    pytest benches/bench_realign_70b.py --benchmark-disable      # the machinery on tiny shapes

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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benches/bench_realign_70b.py` as well as `-m benches.bench_realign_70b`
    sys.path.insert(0, str(REPO))

from benches import make_checkpoint as mc  # noqa: E402
from benches.make_70b_adapter import make_70b_adapters  # noqa: E402

GB = 1e9
LORA_BARS = {"ratio": 1.25, "peak_rss": 6e9, "peak_anon": 2e9}
DENSE_BARS = {"ratio": 1.5, "peak_rss": 8e9, "rss_spread": 0.15}
POLL_S = 0.01


# --- measuring one process -----------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (through /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        try:
            for task in os.listdir(f"/proc/{q}/task"):
                with open(f"/proc/{q}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            log: Path | None = None) -> dict[str, Any]:
    """Run `cmd` to completion; wall time, CPU, exact peak RSS, polled peak anon/file RSS, block I/O."""
    log_f = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log_f, stderr=subprocess.STDOUT)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    samples = 0
    procs = 1
    stop = threading.Event()

    def poll() -> None:
        # Sums over the process tree (a launcher with workers counts as one job).
        nonlocal samples, procs
        while not stop.is_set():
            tree = _tree(p.pid)
            stats = [s for s in map(_proc_status, tree) if s]
            if stats:
                samples += 1
                procs = max(procs, len(stats))
                for k in peaks:
                    peaks[k] = max(peaks[k], sum(s.get(k, 0) for s in stats))
            time.sleep(POLL_S)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        if log is not None:
            log_f.close()  # type: ignore[union-attr]
    p.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": [str(c) for c in cmd],
        "rc": p.returncode,
        "seconds": wall,
        "cpu_seconds": ru.ru_utime + ru.ru_stime,
        "peak_rss": ru.ru_maxrss * 1024,
        "peak_anon": peaks["RssAnon"],
        "peak_file": peaks["RssFile"],
        "polled_peak_rss": peaks["VmRSS"],
        "samples": samples,
        "max_processes": procs,
        "disk_read": ru.ru_inblock * 512,
        "disk_written": ru.ru_oublock * 512,
        "loadavg": [load0, os.getloadavg()[0]],
    }


def _files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            out.append(p)
    return out


_WARM = ("import importlib\n"
         "for m in ('torch', 'safetensors.torch', 'transformers', 'nlsr_fast.cli', 'nlsr_fast.api'):\n"
         "    try:\n"
         "        importlib.import_module(m)\n"
         "    except Exception:\n"
         "        pass\n")


def drop_page_cache(paths: Sequence[Path], env: dict[str, str] | None = None) -> str:
    """Empty the page cache (all of it if permitted, else the clean pages of every file under `paths`).

    After a full drop, the program's own files (Python, torch, transformers, nlsr_fast) are read back once by an
    untimed import, so that a phase pays for cold inputs, not for a cold interpreter.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        subprocess.run([sys.executable, "-c", _WARM], env=env, cwd=REPO, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return "sync; echo 3 > /proc/sys/vm/drop_caches, then an untimed import of torch/transformers/nlsr_fast"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return f"posix_fadvise DONTNEED on every input file (drop_caches: {reason.lower()})"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files([folder]))


def _disk_bytes(folder: Path) -> int:
    """Allocated bytes (a sparse file counts what it really uses)."""
    return sum(p.stat().st_blocks * 512 for p in _files([folder]))


# --- the floors: plain torch + safetensors, in their own process ----------------------------------------------------

_FLOOR = r'''
import json, os, sys, time
t0 = time.perf_counter()
import torch
from safetensors.torch import load_file, save_file
t_import = time.perf_counter() - t0
mode, out, *ins = sys.argv[1:]

def touch(tensors):
    # load_file copies the bytes out of its mapping already; one byte per 4 KiB page makes sure of every page.
    return sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum()) for t in tensors.values())

def fsync_write(tensors, path):
    save_file(tensors, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

os.makedirs(out)
read = written = 0
if mode == "lora":
    aligned, finetuned = ins
    for folder in (aligned, finetuned):
        path = os.path.join(folder, "adapter_model.safetensors")
        tensors = load_file(path)
        touch(tensors)
        read += os.path.getsize(path)
    path = os.path.join(out, "adapter_model.safetensors")
    fsync_write(tensors, path)
    written += os.path.getsize(path)
    with open(os.path.join(finetuned, "adapter_config.json")) as f:
        cfg = f.read()
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        f.write(cfg)
else:
    # Shard i of base, aligned, fine-tuned in turn (the order a streaming realign reads them), then shard i written.
    base, aligned, finetuned = ins
    with open(os.path.join(finetuned, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    for name in shards:
        for folder in (base, aligned, finetuned):
            path = os.path.join(folder, name)
            tensors = load_file(path)
            touch(tensors)
            read += os.path.getsize(path)
        path = os.path.join(out, name)
        fsync_write(tensors, path)
        written += os.path.getsize(path)
        del tensors
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        with open(os.path.join(finetuned, name)) as f, open(os.path.join(out, name), "w") as g:
            g.write(f.read())
fd = os.open(out, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
print(json.dumps({"import_seconds": t_import, "io_seconds": time.perf_counter() - t0 - t_import,
                  "read": read, "written": written}))
'''


def floor_cmd(mode: str, out: Path, inputs: Sequence[Path]) -> list[str]:
    return [sys.executable, "-c", _FLOOR, mode, str(out), *map(str, inputs)]


# --- the realign command --------------------------------------------------------------------------------------------


def nlsr_fast_cmd() -> list[str]:
    """The `nlsr-fast` console script next to this interpreter, else `python -m nlsr_fast`."""
    script = Path(sys.executable).with_name("nlsr-fast")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nlsr_fast"]


_HELP: str | None = None


def realign_help() -> str:
    global _HELP
    if _HELP is None:
        res = subprocess.run([*nlsr_fast_cmd(), "realign", "--help"], capture_output=True, text=True)
        _HELP = res.stdout + res.stderr
    return _HELP


def dense_available() -> bool:
    """The CLI has `--mode` with `dense` and the `magnitude` method."""
    h = realign_help()
    return "--mode" in h and "dense" in h and "magnitude" in h


def realign_cmd(mode: str, base: Path, aligned: Path, finetuned: Path, out: Path) -> list[str]:
    cmd = [*nlsr_fast_cmd(), "realign", str(base), str(aligned), str(finetuned), str(out), "--quiet"]
    if mode == "lora":
        cmd += ["--method", "random"]
        if "--mode" in realign_help():
            cmd += ["--mode", "lora"]
    else:
        cmd += ["--mode", "dense", "--method", "magnitude"]
    return cmd


# --- one bench: floor and realign alternated ------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def run_pair(name: str, mode: str, inputs: dict[str, Path], scratch: Path, repeat: int,
             env: dict[str, str], warm: bool = False) -> dict[str, Any]:
    """`repeat` x (floor, realign), page cache dropped before each; both outputs removed after each phase."""
    floors: list[dict[str, Any]] = []
    reals: list[dict[str, Any]] = []
    cache = ""
    out_bytes = 0
    report: dict[str, Any] | None = None
    drop = [inputs["aligned"], inputs["finetuned"]] + ([inputs["base"]] if mode == "dense" else [])
    for i in range(repeat):
        for phase in ("floor", "realign"):
            out = scratch / f"{name}_{phase}_out"
            shutil.rmtree(out, ignore_errors=True)
            cache = "kept (--warm)" if warm else drop_page_cache(drop, env)
            if phase == "floor":
                floor_in = [inputs["aligned"], inputs["finetuned"]] if mode == "lora" else \
                    [inputs["base"], inputs["aligned"], inputs["finetuned"]]
                cmd = floor_cmd(mode, out, floor_in)
            else:
                cmd = realign_cmd(mode, inputs["base"], inputs["aligned"], inputs["finetuned"], out)
            log = scratch / f"{name}_{phase}_{i}.log"
            print(f"  [{name}] {phase} {i + 1}/{repeat}: {' '.join(cmd[:2]) if phase == 'realign' else 'floor'} ...",
                  flush=True)
            r = measure(cmd, env=env, cwd=REPO, log=log)
            r["log_tail"] = log.read_text(errors="replace")[-3000:]
            if r["rc"] != 0:
                raise RuntimeError(f"{name} {phase} failed (exit {r['rc']}): {' '.join(cmd)}\n{r['log_tail']}")
            if phase == "floor":
                r.update(json.loads(r["log_tail"].strip().splitlines()[-1]))
            else:
                out_bytes = _dir_bytes(out)
                rep = out / "report.json"
                report = json.loads(rep.read_text()) if rep.is_file() else None
                r["output_bytes"] = out_bytes
                r["check"] = check_output(mode, inputs["finetuned"], out, report)
            print(f"    {r['seconds']:.2f} s, cpu {r['cpu_seconds']:.1f} s, peak RSS {r['peak_rss'] / GB:.2f} GB "
                  f"(anon {r['peak_anon'] / GB:.2f}, file {r['peak_file'] / GB:.2f}), disk read "
                  f"{r['disk_read'] / GB:.2f} GB written {r['disk_written'] / GB:.2f} GB, load "
                  f"{r['loadavg'][0]:.1f}->{r['loadavg'][1]:.1f}", flush=True)
            (floors if phase == "floor" else reals).append(r)
            shutil.rmtree(out, ignore_errors=True)
    res: dict[str, Any] = {
        "mode": mode,
        "inputs": {k: {"path": str(v), "bytes": _dir_bytes(v), "disk_bytes": _disk_bytes(v)}
                   for k, v in inputs.items()},
        "page_cache": cache,
        "floor_runs": floors,
        "realign_runs": reals,
        "output_bytes": out_bytes,
    }
    for label, runs in (("floor", floors), ("realign", reals)):
        res[label] = {k: _median(runs, k) for k in ("seconds", "cpu_seconds", "peak_rss", "peak_anon", "peak_file",
                                                       "disk_read", "disk_written")}
    res["ratio"] = res["realign"]["seconds"] / res["floor"]["seconds"]
    res["ratios"] = [r["seconds"] / f["seconds"] for f, r in zip(floors, reals, strict=True)]
    if report is not None:
        res["report_summary"] = _report_summary(report)
    return res


def _report_summary(report: dict[str, Any]) -> dict[str, Any]:
    mods = report.get("modules") or []
    out: dict[str, Any] = {"modules": len(mods), "restored": sum(bool(m.get("restored")) for m in mods)}
    for key in ("timings", "stages", "bytes_read", "bytes_written"):
        if key in report:
            out[key] = report[key]
    return out


def check_output(mode: str, finetuned: Path, out: Path, report: dict[str, Any] | None) -> dict[str, Any]:
    """Cheap checks of the written output: same tensor names, shapes and dtypes as the fine-tuned input."""
    from safetensors import safe_open

    def headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        files = [folder / "adapter_model.safetensors"] if mode == "lora" else \
            sorted(folder.glob("model*.safetensors"))
        info: dict[str, tuple[str, tuple[int, ...]]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                    sl = h.get_slice(k)
                    info[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        return info

    problems = []
    want, got = headers(finetuned), headers(out)
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        problems.append(f"tensors differ from the fine-tuned input (missing {missing}, "
                        f"{len(got)} vs {len(want)} tensors)")
    if report is None:
        problems.append("no report.json")
    if mode == "dense" and not ((out / "model.safetensors.index.json").is_file()
                                or (out / "model.safetensors").is_file()):
        problems.append("neither model.safetensors.index.json nor model.safetensors")
    if mode == "dense" and not (out / "config.json").is_file():
        problems.append("no config.json")
    return {"ok": not problems, "problems": problems, "tensors": len(got)}


# --- data -----------------------------------------------------------------------------------------------------------


def lora_inputs(workdir: Path, layers: int, rank: int, geometry: dict[str, int], base_shape: mc.Shape
                ) -> dict[str, Path]:
    t0 = time.perf_counter()
    folders = make_70b_adapters(layers, rank=rank, workdir=workdir, geometry=geometry, verbose=True)
    base_root = workdir / f"sparse_base_h{base_shape.hidden}_L{layers}"
    if not (base_root / "base" / "config.json").is_file():
        shutil.rmtree(base_root, ignore_errors=True)
        mc.make_checkpoints(base_root, base_shape, kinds=("base",), sparse=True, tokenizer=False, verbose=False)
    print(f"  LoRA inputs ready in {time.perf_counter() - t0:.1f} s: {folders['aligned'].parent}", flush=True)
    return {"base": base_root / "base", **folders}


def dense_inputs(workdir: Path, shape: mc.Shape, shard_gb: float) -> dict[str, Path]:
    root = workdir / f"dense_h{shape.hidden}_L{shape.layers}_v{shape.vocab}"
    done = root / "make_checkpoint.json"
    if not done.is_file() or json.loads(done.read_text()).get("shape", {}).get("layers") != shape.layers:
        shutil.rmtree(root, ignore_errors=True)
        mc.make_checkpoints(root, shape, shard_bytes=int(shard_gb * 1e9), tokenizer=True, verbose=True)
    return {k: root / k for k in mc.KINDS}


def _check_dense_disk(workdir: Path, shape: mc.Shape, shard_gb: float) -> tuple[bool, str]:
    per = mc.checkpoint_bytes(shape, mc._DTYPES["bfloat16"], int(shard_gb * 1e9))
    root = workdir / f"dense_h{shape.hidden}_L{shape.layers}_v{shape.vocab}"
    have = _disk_bytes(root) if root.exists() else 0
    need = 3 * per - have + int(1.1 * per) + mc.HEADROOM  # inputs + one output (+ masks) at a time
    free = mc._free_bytes(workdir)
    msg = (f"{shape.layers} layers: 3 inputs x {per / GB:.2f} GB + one output ~{1.1 * per / GB:.2f} GB "
           f"(+{mc.HEADROOM / GB:.0f} GB headroom; {have / GB:.2f} GB already there) -> need {need / GB:.2f} GB, "
           f"{free / GB:.2f} GB free")
    return need <= free, msg


# --- report ---------------------------------------------------------------------------------------------------------


def _gb(v: float | None) -> str:
    return "-" if v is None else f"{v / GB:.2f}"


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    bars: dict[str, Any] = {}
    lo = result.get("lora")
    if lo:
        r = lo["realign"]
        bars["lora"] = {
            "ratio": [lo["ratio"], LORA_BARS["ratio"], lo["ratio"] <= LORA_BARS["ratio"]],
            "peak_rss": [r["peak_rss"], LORA_BARS["peak_rss"], r["peak_rss"] <= LORA_BARS["peak_rss"]],
            "peak_anon": [r["peak_anon"], LORA_BARS["peak_anon"], r["peak_anon"] <= LORA_BARS["peak_anon"]],
        }
    dense = result.get("dense") or {}
    if dense:
        d: dict[str, Any] = {}
        for L, res in sorted(dense.items(), key=lambda kv: int(kv[0])):
            d[f"ratio_{L}"] = [res["ratio"], DENSE_BARS["ratio"], res["ratio"] <= DENSE_BARS["ratio"]]
            rss = res["realign"]["peak_rss"]
            d[f"peak_rss_{L}"] = [rss, DENSE_BARS["peak_rss"], rss < DENSE_BARS["peak_rss"]]
        rss_all = [res["realign"]["peak_rss"] for res in dense.values()]
        if len(rss_all) > 1:
            spread = max(rss_all) / min(rss_all) - 1
            d["rss_spread"] = [spread, DENSE_BARS["rss_spread"], spread <= DENSE_BARS["rss_spread"]]
        bars["dense"] = d
        result["extrapolation"] = extrapolate(result)
    return bars


def extrapolate(result: dict[str, Any]) -> dict[str, Any] | None:
    """Linear in depth from the two dense runs: x(80) = x(a) + (80 - a) (x(b) - x(a)) / (b - a)."""
    dense = result.get("dense") or {}
    if len(dense) < 2:
        return None
    (a, ra), (b, rb) = sorted(((int(k), v) for k, v in dense.items()))[:2]
    target = 80

    def line(xa: float, xb: float) -> tuple[float, float, str, float]:
        per = (xb - xa) / (b - a)
        val = xa + (target - a) * per
        return per, val, f"{xa:.2f} + ({target} - {a}) x ({xb:.2f} - {xa:.2f}) / {b - a} = {val:.2f}", xa

    out: dict[str, Any] = {"layers": target, "from": [a, b]}
    for key, xa, xb, unit in (
        ("realign_seconds", ra["realign"]["seconds"], rb["realign"]["seconds"], "s"),
        ("floor_seconds", ra["floor"]["seconds"], rb["floor"]["seconds"], "s"),
        ("checkpoint_gb", ra["inputs"]["finetuned"]["bytes"] / GB, rb["inputs"]["finetuned"]["bytes"] / GB, "GB"),
        ("output_gb", ra["output_bytes"] / GB, rb["output_bytes"] / GB, "GB"),
    ):
        per, val, text, _ = line(xa, xb)
        out[key] = {"per_layer": per, "value": val, "arithmetic": text + " " + unit}
    # Peak RSS is bounded by the largest module, not the depth: no line through it, the larger of the two stands.
    rss = max(ra["realign"]["peak_rss"], rb["realign"]["peak_rss"]) / GB
    out["peak_rss_gb"] = {"value": rss, "arithmetic": (
        f"not extrapolated (per-module bound): {ra['realign']['peak_rss'] / GB:.2f} GB at {a} layers, "
        f"{rb['realign']['peak_rss'] / GB:.2f} GB at {b}; expect about {rss:.2f} GB at {target}")}
    ck, og = out["checkpoint_gb"]["value"], out["output_gb"]["value"]
    out["disk_gb"] = {"value": 3 * ck + og,
                      "arithmetic": f"3 inputs x {ck:.1f} GB + output {og:.1f} GB = {3 * ck + og:.1f} GB"}
    # The real vocabulary (128256) adds (128256 - vocab) x 8192 x 2 bytes x 2 (embed_tokens + lm_head) per checkpoint.
    shape = result["config"]["dense_shape"]
    extra = (128256 - shape["vocab"]) * shape["hidden"] * 2 * 2 / GB
    out["real_vocab_extra_gb_per_checkpoint"] = {
        "value": extra,
        "arithmetic": f"(128256 - {shape['vocab']}) x {shape['hidden']} x 2 B x 2 tensors = {extra:.2f} GB"}
    return out


def format_markdown(result: dict[str, Any]) -> str:
    c, m, git = result["config"], result["machine"], result.get("git", {})
    lines = [
        "# `nlsr-fast realign` at Llama-3-70B shapes: whole process against the I/O floor",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {m['platform']}, {m['cpus']} CPUs, {m['mem_total'] / 2**30:.0f} GiB RAM, load average "
        f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end (other jobs share it)",
        f"- page cache before each phase: {result.get('page_cache', '-')}",
        f"- code: commit {git.get('commit', '?')}"
        + (f", with uncommitted changes in {', '.join(git['library_files_modified'])}"
           if git.get("library_files_modified") else " (library files unmodified)"),
        f"- repeats: {c['repeat']} (each floor/realign alternated; medians shown)",
        "- peak RSS: the child's kernel high-water mark (wait4 ru_maxrss: the largest of the process and its "
        f"reaped children); anon / file: largest RssAnon / RssFile polled every {POLL_S * 1000:.0f} ms, summed over "
        "the process tree; disk read / written: the child's block I/O (ru_inblock / ru_oublock)",
        "",
        "| bench | phase | wall s (median) | runs s | cpu s | peak RSS GB | peak anon GB | peak file GB | "
        "disk read GB | disk written GB | realign / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    benches: list[tuple[str, dict[str, Any]]] = []
    if result.get("lora"):
        benches.append((f"LoRA {c['lora_layers']}L r={c['rank']}", result["lora"]))
    for L, res in sorted((result.get("dense") or {}).items(), key=lambda kv: int(kv[0])):
        benches.append((f"dense {L}L", res))
    for label, res in benches:
        for phase in ("floor", "realign"):
            med = res[phase]
            runs = ", ".join(f"{r['seconds']:.1f}" for r in res[f"{phase}_runs"])
            ratio = f"**{res['ratio']:.2f}x**" if phase == "realign" else ""
            lines.append(f"| {label} | {phase} | {med['seconds']:.2f} | {runs} | {med['cpu_seconds']:.1f} | "
                         f"{_gb(med['peak_rss'])} | {_gb(med['peak_anon'])} | {_gb(med['peak_file'])} | "
                         f"{_gb(med['disk_read'])} | {_gb(med['disk_written'])} | {ratio} |")
    lines += ["", "Inputs:", ""]
    for label, res in benches:
        ins = ", ".join(f"{k} {_gb(v['bytes'])} GB" + (" (sparse: headers only)" if v["disk_bytes"] < v["bytes"] / 10
                                                        else "") for k, v in res["inputs"].items())
        chk = res["realign_runs"][-1].get("check", {})
        rs = res.get("report_summary", {})
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in (rs.get("timings") or {}).items()
                            if isinstance(v, int | float))
        lines.append(f"- {label}: {ins}; output {_gb(res['output_bytes'])} GB; restored {rs.get('restored', '?')} of "
                     f"{rs.get('modules', '?')} modules; output check: "
                     f"{'ok' if chk.get('ok') else 'FAILED ' + '; '.join(chk.get('problems', []))}"
                     + (f"; report.json timings (last run): {timings}" if timings else ""))
    bars = result.get("bars", {})
    if bars:
        lines += ["", "Bars:", "", "| bench | bar | measured | limit | met |", "|---|---|---|---|---|"]
        for bench, items in bars.items():
            for key, (val, lim, ok) in items.items():
                if "ratio" in key:
                    txt, ltxt = f"{val:.2f}x", f"<= {lim:.2f}x"
                elif "spread" in key:
                    txt, ltxt = f"{val * 100:.1f}%", f"<= {lim * 100:.0f}%"
                else:
                    txt, ltxt = f"{val / GB:.2f} GB", f"{'<' if bench == 'dense' else '<='} {lim / GB:.0f} GB"
                lines.append(f"| {bench} | {key} | {txt} | {ltxt} | {_ok(ok)} |")
    ex = result.get("extrapolation")
    if ex:
        lines += ["", f"Extrapolated to {ex['layers']} layers (linear in depth from {ex['from'][0]} and "
                      f"{ex['from'][1]} layers, vocab {c['dense_shape']['vocab']}):", ""]
        for key in ("realign_seconds", "floor_seconds", "checkpoint_gb", "output_gb", "peak_rss_gb"):
            lines.append(f"- {key.replace('_', ' ')}: {ex[key]['arithmetic']}")
        lines.append(f"- disk for one dense realign: {ex['disk_gb']['arithmetic']}")
        lines.append(f"- the real vocabulary adds {ex['real_vocab_extra_gb_per_checkpoint']['arithmetic']} per "
                     "checkpoint")
    if result.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


# --- driver ---------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, *, layers: int = 80) -> None:
    p.add_argument("--layers", type=int, default=layers, help=f"LoRA bench decoder layers (default {layers})")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (default 128)")
    p.add_argument("--dense-layers", default="2,4" if layers == 80 else "",
                   help="comma-separated depths of the dense bench ('' skips it; default '2,4' for the full run)")
    p.add_argument("--vocab", type=int, default=32000, help="dense checkpoints' vocabulary (default 32000)")
    p.add_argument("--shape", choices=sorted(mc.SHAPES), default="llama-3-70b", help="model shape")
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA bench")
    p.add_argument("--no-dense", action="store_true", help="skip the dense bench")
    p.add_argument("--repeat", type=int, default=1, help="floor/realign pairs per bench (medians reported)")
    p.add_argument("--workdir", type=Path, default=Path("/work/bench_data") if Path("/work").is_dir()
                   else Path(tempfile.gettempdir()) / "nlsr_fast_bench_cache",
                   help="where inputs and outputs go (outside the repository)")
    p.add_argument("--warm", action="store_true", help="keep the page cache (no drop before each phase)")
    p.add_argument("--keep-data", action="store_true", help="keep the generated checkpoints and adapters")
    p.add_argument("--results", type=Path, default=None, metavar="PREFIX",
                   help="write PREFIX.md and PREFIX.json (e.g. benches/results/realign_70b)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--note", action="append", default=[], help="a line added to the results' notes (repeatable)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="run nothing: print (and with --results write) the markdown of an earlier run's JSON")


def _git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        res = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return res.stdout.rstrip("\n") if res.returncode == 0 else ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "nlsr_fast", "csrc").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD"), "library_files_modified": dirty}


def _save_partial(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """What is measured so far, as PREFIX.partial.json (a long run that dies keeps its finished benches)."""
    if getattr(args, "results", None) is not None:
        Path(args.results).with_suffix(".partial.json").write_text(json.dumps(result, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    if workdir.resolve().is_relative_to(REPO):
        raise SystemExit(f"--workdir {workdir} lies inside the repository; use a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    shape0 = mc.SHAPES[args.shape]
    geometry = {"hidden": shape0.hidden, "intermediate": shape0.intermediate, "heads": shape0.heads,
                "kv_heads": shape0.kv_heads, "head_dim": shape0.head_dim}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benches.bench_realign_70b " + " ".join(sys.argv[1:]),
        "config": {"shape": args.shape, "lora_layers": args.layers, "rank": args.rank, "repeat": args.repeat,
                   "dense_shape": {"hidden": shape0.hidden, "vocab": args.vocab}, "shard_gb": args.shard_gb},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "loadavg_start": list(os.getloadavg())},
        "git": _git_state(),
        "notes": [],
    }
    scratch = workdir / "bench_out"
    scratch.mkdir(exist_ok=True)
    made: list[Path] = []
    try:
        if not args.no_lora:
            print(f"LoRA bench: {args.layers} layers, r={args.rank}", flush=True)
            base_shape = dataclasses.replace(shape0, layers=args.layers)
            ins = lora_inputs(workdir, args.layers, args.rank, geometry, base_shape)
            made += [ins["aligned"].parent, ins["base"].parent]
            result["lora"] = run_pair("lora", "lora", ins, scratch, args.repeat, env, args.warm)
            _save_partial(args, result)
            result["page_cache"] = result["lora"]["page_cache"]
        depths = [int(x) for x in str(args.dense_layers).split(",") if x.strip()]
        if depths and not args.no_dense:
            if not dense_available():
                note = ("dense bench skipped: `nlsr-fast realign --help` has no `--mode dense` / `magnitude` "
                        "method yet")
                print(note, flush=True)
                result["notes"].append(note)
            else:
                result["dense"] = {}
                for L in depths:
                    shape = dataclasses.replace(shape0, layers=L, vocab=args.vocab)
                    fits, msg = _check_dense_disk(workdir, shape, args.shard_gb)
                    print(f"dense bench: {msg}", flush=True)
                    if not fits:
                        result["notes"].append(f"dense {L} layers skipped, not enough disk: {msg}")
                        continue
                    ins = dense_inputs(workdir, shape, args.shard_gb)
                    made.append(ins["base"].parent)
                    result["dense"][str(L)] = run_pair(f"dense{L}", "dense", ins, scratch, args.repeat, env,
                                                        args.warm)
                    result["page_cache"] = result["dense"][str(L)]["page_cache"]
                    _save_partial(args, result)
                    if not args.keep_data:
                        shutil.rmtree(ins["base"].parent, ignore_errors=True)
    finally:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep_data:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
    result["bars"] = summarize(result)
    return result


def run_cli(args: argparse.Namespace) -> int:
    if getattr(args, "render", None) is not None:
        result = json.loads(Path(args.render).read_text())
        result["bars"] = summarize(result)
    else:
        result = run(args)
    result.setdefault("notes", []).extend(getattr(args, "note", []) or [])
    md = format_markdown(result)
    print(md)
    if args.results is not None:
        prefix = Path(args.results)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(md)
        prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        prefix.with_suffix(".partial.json").unlink(missing_ok=True)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    checks = [r.get("check", {}).get("ok", False) for b in [result.get("lora"), *(result.get("dense") or {}).values()]
              if b for r in b["realign_runs"]]
    return 0 if all(checks) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bench_realign_70b", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


# --- smoke test (tiny shapes; what `pytest benches --benchmark-disable` runs) -----------------------------------------


def test_realign_bench_machinery_tiny(tmp_path: Path) -> None:
    """LoRA and (once the CLI has it) dense benches end to end on tiny shapes: every phase runs and is measured."""
    p = argparse.ArgumentParser()
    add_arguments(p, layers=2)
    dense = "1,2" if dense_available() else ""
    args = p.parse_args(["--workdir", str(tmp_path), "--shape", "tiny", "--rank", "4", "--vocab", "160",
                         "--dense-layers", dense, "--shard-gb", "0.0001", "--warm"])
    result = run(args)
    lo = result["lora"]
    assert lo["realign_runs"][0]["check"]["ok"], lo["realign_runs"][0]["check"]
    for phase in ("floor", "realign"):
        assert lo[phase]["seconds"] > 0 and lo[phase]["peak_rss"] > 0 and lo[phase]["peak_anon"] > 0
    assert lo["floor_runs"][0]["read"] > 0 and lo["floor_runs"][0]["written"] > 0
    if dense:
        assert set(result["dense"]) == {"1", "2"}
        assert "realign_seconds" in result["extrapolation"]  # its value is noise at tiny shapes
        assert all(r["check"]["ok"] for d in result["dense"].values() for r in d["realign_runs"])
    md = format_markdown(result)
    assert "| LoRA 2L r=4 | realign |" in md and "Bars:" in md
    assert not any(tmp_path.glob("llama*")) and not (tmp_path / "bench_out").exists()


if __name__ == "__main__":
    raise SystemExit(main())
