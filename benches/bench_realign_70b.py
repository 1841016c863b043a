"""similarity + select + restore + write on LoRA adapters with Llama-3-70B shapes, against plain adapter I/O.

Three synthetic PEFT adapters (benches/make_70b_adapter.py: 80 layers x 7 modules, r = 128, bf16, ~1.6 GB each;
aligned, fine-tuned = aligned + noise on about half the modules, reference = amplify(aligned) stored in bf16) are
generated once and cached. Then two phases run, each in a fresh subprocess (its own peak RSS), with the page
cache of the input files dropped before each (posix_fadvise DONTNEED; --warm keeps it):

- baseline: safetensors `load_file` of the three adapters, touching every page of every tensor, then
  `write_adapter` of the fine-tuned tensors into an `atomic_output` folder (fsync'd), i.e. the I/O floor.
- pipeline: what `nlsr_fast.realign(..., reference=..., method="random")` does, stage by stage with the public
  stage functions: load (fine-tuned factors as lazy views, reference factors in fp32 as realign loads them),
  masks (`score("random")`, sparsity 0.8, reported separately), then the timed part: similarity, select
  (adaptive), restore, write (`atomic_output` + `write_adapter(output_tensors(...))` + `write_masks`). The
  per-module records and the input hashes realign adds to its report are measured as extra stages.

Each stage records wall and CPU seconds, bytes read (first touch) and written, and its own peak RSS (VmHWM reset
through /proc/self/clear_refs) split into anonymous and file-backed pages by a 10 ms sampler. The output is then
checked on a sample of modules: restored entries equal the reference (in bf16) where the mask is set and are
bit-identical to the fine-tuned adapter elsewhere; unrestored modules are bit-identical.

    python -m benches.bench_realign_70b --layers 80 --workdir /tmp/nlsr70b --json out.json
    python -m nlsr_fast.bench realign                # the same, 2 layers
    pytest benches/bench_realign_70b.py --benchmark-disable    # 2-layer smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
TIMED = ("similarity", "select", "restore", "write")
PHASES = ("baseline", "pipeline")


# --- memory probes -------------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Per-stage wall/CPU time, bytes and peak memory; a sampler thread tracks peak anonymous / file RSS."""

    def __init__(self, interval: float = 0.01) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self._peak = {"RssAnon": 0, "RssFile": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            s = _status()
            with self._lock:
                for k in self._peak:
                    self._peak[k] = max(self._peak[k], s[k])

    @contextlib.contextmanager
    def stage(self, name: str, *, read: int = 0, written: int = 0) -> Iterator[dict[str, Any]]:
        hwm_ok = _reset_hwm()
        start = _status()
        with self._lock:
            self._peak = {"RssAnon": start["RssAnon"], "RssFile": start["RssFile"]}
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        load0 = os.getloadavg()[0]
        rec: dict[str, Any] = {"read": read, "written": written}
        t0 = time.perf_counter()
        yield rec
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        end = _status()
        with self._lock:
            peak = dict(self._peak)
        rec.update(
            seconds=wall,
            cpu_seconds=(ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
            rss_start=start["VmRSS"],
            rss_end=end["VmRSS"],
            peak_rss=end["VmHWM"] if hwm_ok else None,
            peak_anon=max(peak["RssAnon"], end["RssAnon"]),
            peak_file=max(peak["RssFile"], end["RssFile"]),
            loadavg_1m=[load0, os.getloadavg()[0]],
        )
        self.stages[name] = rec

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _drop_page_cache(paths: Sequence[Path]) -> None:
    """Evict the files' clean pages from the page cache (no root needed), so reads come from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _weights(folder: Path) -> Path:
    return folder / "adapter_model.safetensors"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- the two phases (run in a subprocess each) ---------------------------------------------------------------------


def phase_baseline(folders: dict[str, Path], out: Path) -> dict[str, Any]:
    """Read all three adapters (every tensor, every page touched), write the fine-tuned one."""
    import torch
    from safetensors.torch import load_file

    from nlsr_fast.io import atomic_output, write_adapter

    meter = Meter()
    ft_tensors: dict[str, torch.Tensor] = {}
    try:
        for kind in ("aligned", "reference", "finetuned"):
            path = _weights(folders[kind])
            with meter.stage(f"read {kind}", read=path.stat().st_size):
                tensors = load_file(os.fspath(path))
                touched = 0
                for t in tensors.values():
                    # One byte per 4 KiB page faults every page in (the read), without a copy.
                    touched += int(t.reshape(-1).view(torch.uint8)[::4096].sum())
            if kind == "finetuned":
                ft_tensors = tensors
            del tensors
        config = json.loads((folders["finetuned"] / "adapter_config.json").read_text())
        with meter.stage("write") as rec:
            with atomic_output(out, inputs=list(folders.values()), overwrite=True) as tmp:
                write_adapter(tmp, config, ft_tensors, metadata={"format": "pt"})
            rec["written"] = _dir_bytes(out)
    finally:
        meter.close()
    return {"stages": meter.stages, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _sample_modules(names: list[str], restored: set[str], count: int) -> list[str]:
    if count <= 0 or count >= len(names):
        return list(names)
    step = (len(names) - 1) / max(count - 1, 1)
    picked = {names[round(i * step)] for i in range(count)}
    picked |= set([n for n in names if n in restored][:3]) | set([n for n in names if n not in restored][:3])
    return [n for n in names if n in picked]


def _verify(out: Path, ft: Any, al: Any, ref_factors: dict, masks: dict, sims: dict[str, float],
            restored: set[str], sample: list[str]) -> dict[str, Any]:
    """Check the written adapter on `sample` modules against the fine-tuned factors, reference and masks."""
    import torch

    from nlsr_fast.io import LoraAdapter

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.int16)

    res = LoraAdapter.load(out)
    problems: list[str] = []
    if res.raw_keys != ft.raw_keys and sorted(res.raw_keys) != sorted(ft.raw_keys):
        problems.append("output tensor keys differ from the fine-tuned adapter's")
    checked = {"restored": 0, "unrestored": 0, "masked_entries": 0, "entries": 0}
    unperturbed_sims: list[float] = []
    for name in sample:
        got = res.factors(name)
        t = ft.factors(name)
        for which, g, ti, e, m in zip("AB", got, t, ref_factors[name], masks[name], strict=True):
            if g.dtype != ti.dtype or g.shape != ti.shape:
                problems.append(f"{name}.lora_{which}: dtype/shape {g.dtype} {list(g.shape)} != {ti.dtype}")
                continue
            checked["entries"] += g.numel()
            if name in restored:
                mb = m.to_bool()
                e16 = e.to(ti.dtype)
                if not torch.equal(bits(g)[mb], bits(e16)[mb]):
                    problems.append(f"{name}.lora_{which}: masked entries differ from the reference")
                if not torch.equal(bits(g)[~mb], bits(ti)[~mb]):
                    problems.append(f"{name}.lora_{which}: unmasked entries differ from the fine-tuned adapter")
                checked["masked_entries"] += int(mb.sum())
            elif not torch.equal(bits(g), bits(ti)):
                problems.append(f"{name}.lora_{which}: unrestored module is not bit-identical to the fine-tuned one")
        checked["restored" if name in restored else "unrestored"] += 1
        a_al, b_al = al.factors(name)
        if torch.equal(bits(a_al), bits(t[0])) and torch.equal(bits(b_al), bits(t[1])):
            unperturbed_sims.append(sims[name])
    # The fine-tuned factors equal the aligned ones there, and the reference is aligned x sqrt(1.9) (bf16): S ~ 1.
    if unperturbed_sims and min(unperturbed_sims) < 0.999:
        problems.append(f"an unperturbed module has similarity {min(unperturbed_sims):.6f} < 0.999")
    return {"ok": not problems, "problems": problems[:20], "modules_checked": len(sample), **checked,
            "unperturbed_modules": len(unperturbed_sims),
            "min_unperturbed_similarity": min(unperturbed_sims) if unperturbed_sims else None}


def phase_pipeline(folders: dict[str, Path], out: Path, *, sparsity: float, seed: int, reference_mode: str,
                   verify_modules: int, hash_inputs: bool) -> dict[str, Any]:
    """The realign stages with method random and a ready reference (or the amplify stage), timed one by one."""
    import torch

    from nlsr_fast.io import LoraAdapter, atomic_output, check_compatible, file_record, write_adapter
    from nlsr_fast.pipeline import amplify, changed_entries, restore, score, select, similarity
    from nlsr_fast.pipeline.write import MASKS_FILE, output_tensors, write_masks

    meter = Meter()
    try:
        ft = LoraAdapter.load(folders["finetuned"])
        al = LoraAdapter.load(folders["aligned"])
        ref = LoraAdapter.load(folders["reference"])
        check_compatible(ft, al)
        check_compatible(ft, ref)
        names = ft.modules
        src = ref if reference_mode == "file" else al
        with meter.stage("load", read=src.nbytes):
            # As realign_with_config: fine-tuned factors as stored (lazy, memory-mapped), reference in fp32.
            ft_factors = {n: ft.factors(n) for n in names}
            if reference_mode == "file":
                ref_factors = {n: tuple(t.to(torch.float32) for t in ref.factors(n)) for n in names}
            else:
                ref_factors = amplify({n: al.factors(n) for n in names}, 0.9, "paper")
        with meter.stage("masks"):
            masks = score("random", ref_factors, sparsity=sparsity, preset="paper", seed=seed)
        with meter.stage("similarity", read=ft.nbytes):
            sims = similarity(ft_factors, ref_factors, masks)
        with meter.stage("select"):
            chosen = select([sims[n] for n in names], selection="adaptive", prune_rate=0.5, epsilon=0.2, seed=seed,
                            preset="paper")
            restored = {n for n, flag in zip(names, chosen.restored, strict=True) if flag}
        with meter.stage("restore"):
            new_factors = restore(ft_factors, ref_factors, masks, restored)
        with meter.stage("records"):
            # What realign computes for its report between restore and write.
            changed = 0
            for n in names:
                mask_a, mask_b = masks[n]
                mask_a.density(), mask_b.density()
                if n in restored:
                    changed += changed_entries(ft_factors[n][0], new_factors[n][0])
                    changed += changed_entries(ft_factors[n][1], new_factors[n][1])
        with meter.stage("write") as rec:
            inputs = list(folders.values())
            with atomic_output(out, inputs=inputs, overwrite=True) as tmp:
                write_adapter(tmp, ft.config, output_tensors(ft, new_factors, restored),
                              metadata={"format": "pt", "nlsr_fast": "bench"})
                write_masks(tmp / MASKS_FILE, masks)
            rec["written"] = _dir_bytes(out)
            rec["written_adapter"] = _weights(out).stat().st_size
        if hash_inputs:
            with meter.stage("hash inputs", read=sum(p.stat().st_size for a in (al, ft, ref) for p in a.files)):
                # realign's report.json records the sha256 of every input adapter file.
                for a in (al, ft, ref):
                    for p in a.files:
                        file_record(p)
        sample = _sample_modules(names, restored, verify_modules)
        t0 = time.perf_counter()
        verify = _verify(out, ft, al, ref_factors, masks, sims, restored, sample)
        verify["seconds"] = time.perf_counter() - t0
    finally:
        meter.close()
    s = sorted(sims.values())
    return {
        "stages": meter.stages,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "modules": len(names),
        "restored": len(restored),
        "changed_entries": changed,
        "similarity": {"min": s[0], "median": s[len(s) // 2], "max": s[-1]},
        "verify": verify,
    }


# --- driver --------------------------------------------------------------------------------------------------------


def _run_phase(phase: str, folders: dict[str, Path], out: Path, args: argparse.Namespace,
               subprocess_: bool) -> dict[str, Any]:
    if not args.warm:
        _drop_page_cache([_weights(f) for f in folders.values()])
    if not subprocess_:
        return _child(phase, folders, out, args)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, "-m", "benches.bench_realign_70b", "--_child", phase, "--_result", str(result_path),
           "--_out", str(out), "--sparsity", str(args.sparsity), "--seed", str(args.seed),
           "--reference-mode", args.reference_mode, "--verify-modules", str(args.verify_modules),
           *(["--no-hash"] if args.no_hash else []),
           *[x for kind in ("aligned", "finetuned", "reference") for x in (f"--_{kind}", str(folders[kind]))]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


def _child(phase: str, folders: dict[str, Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    if phase == "baseline":
        return phase_baseline(folders, out)
    return phase_pipeline(folders, out, sparsity=args.sparsity, seed=args.seed, reference_mode=args.reference_mode,
                          verify_modules=args.verify_modules, hash_inputs=not args.no_hash)


def _sum(stages: dict[str, dict[str, Any]], names: Sequence[str], key: str) -> float:
    return float(sum(stages[n][key] for n in names if n in stages))


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Totals and ratios: the timed part (similarity + select + restore + write) against the baseline."""
    base, pipe = result["baseline"]["stages"], result["pipeline"]["stages"]
    b_s = _sum(base, list(base), "seconds")
    b_bytes = _sum(base, list(base), "read") + _sum(base, list(base), "written")
    t_s = _sum(pipe, TIMED, "seconds")
    t_bytes = _sum(pipe, TIMED, "read") + _sum(pipe, TIMED, "written")
    e2e = [n for n in ("load", "masks", *TIMED, "records") if n in pipe]
    e_s = _sum(pipe, e2e, "seconds")
    e_bytes = _sum(pipe, e2e, "read") + _sum(pipe, e2e, "written")
    return {
        "baseline_seconds": b_s,
        "baseline_bytes": b_bytes,
        "baseline_gbps": b_bytes / b_s / GB,
        "timed_seconds": t_s,
        "timed_bytes": t_bytes,
        "timed_gbps": t_bytes / t_s / GB,
        "timed_over_baseline": t_s / b_s,
        "end_to_end_stages": e2e,
        "end_to_end_seconds": e_s,
        "end_to_end_gbps": e_bytes / e_s / GB,
        "end_to_end_over_baseline": e_s / b_s,
        "timed_peak_rss": max(pipe[n]["peak_rss"] or 0 for n in TIMED),
        "timed_peak_anon": max(pipe[n]["peak_anon"] for n in TIMED),
        "baseline_ru_maxrss": result["baseline"]["ru_maxrss"],
        "pipeline_ru_maxrss": result["pipeline"]["ru_maxrss"],
    }


def _gb(v: float | None) -> str:
    return "-" if v is None else f"{v / GB:.2f}"


def format_table(result: dict[str, Any]) -> str:
    head = ["phase", "stage", "wall s", "cpu s", "read GB", "written GB", "GB/s", "peak RSS GB", "peak anon GB",
            "peak file GB"]
    rows = []
    for phase in PHASES:
        for name, r in result[phase]["stages"].items():
            moved = r["read"] + r["written"]
            rows.append([phase, name + (" *" if phase == "pipeline" and name in TIMED else ""), f"{r['seconds']:.2f}",
                         f"{r['cpu_seconds']:.1f}", _gb(r["read"]), _gb(r["written"]),
                         f"{moved / r['seconds'] / GB:.2f}" if moved else "-", _gb(r["peak_rss"]),
                         _gb(r["peak_anon"]), _gb(r["peak_file"])])
    s = result["summary"]
    rows.append(["baseline", "total", f"{s['baseline_seconds']:.2f}", "", "", "", f"{s['baseline_gbps']:.2f}",
                 _gb(s["baseline_ru_maxrss"]), "", ""])
    rows.append(["pipeline", "timed total *", f"{s['timed_seconds']:.2f}", "", "", "", f"{s['timed_gbps']:.2f}",
                 _gb(s["timed_peak_rss"]), _gb(s["timed_peak_anon"]), ""])
    rows.append(["pipeline", "load..write", f"{s['end_to_end_seconds']:.2f}", "", "", "",
                 f"{s['end_to_end_gbps']:.2f}", _gb(s["pipeline_ru_maxrss"]), "", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [head, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def add_arguments(p: argparse.ArgumentParser, *, layers: int = 80) -> None:
    p.add_argument("--layers", type=int, default=layers, help=f"decoder layers (default {layers}; 80 = Llama-3-70B)")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the adapters are cached and the outputs written (default $NLSR_BENCH_CACHE or "
                        "<tmp>/nlsr_fast_bench_cache)")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--reference-mode", choices=("file", "amplify"), default="file",
                   help="file: load the stored reference adapter in fp32 (realign's reference=); amplify: the "
                        "amplify stage on the aligned adapter")
    p.add_argument("--verify-modules", type=int, default=28, help="modules checked in the output (0 = all)")
    p.add_argument("--warm", action="store_true", help="keep the inputs in the page cache (default: drop them)")
    p.add_argument("--no-hash", action="store_true", help="skip the input hashing stage")
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace, *, subprocess_: bool = True) -> dict[str, Any]:
    """Generate (or reuse) the adapters, run both phases, return the results with a summary."""
    import torch

    from benches.make_70b_adapter import make_70b_adapters

    t0 = time.perf_counter()
    folders = make_70b_adapters(args.layers, rank=args.rank, workdir=args.workdir)
    gen_s = time.perf_counter() - t0
    root = folders["finetuned"].parent
    result: dict[str, Any] = {
        "config": {"layers": args.layers, "rank": args.rank, "modules": 7 * args.layers, "dtype": "bf16",
                   "sparsity": args.sparsity, "seed": args.seed, "method": "random", "selection": "adaptive",
                   "reference_mode": args.reference_mode, "page_cache": "warm" if args.warm else "dropped"},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform(), "loadavg_start": list(os.getloadavg()),
                    "mem_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "adapters": {k: {"path": str(v), "bytes": _weights(v).stat().st_size} for k, v in folders.items()},
        "generation_seconds_this_run": gen_s,
    }
    try:
        for phase in PHASES:
            out = root / f"out_{phase}"
            result[phase] = _run_phase(phase, folders, out, args, subprocess_)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["summary"] = summarize(result)
    return result


def run_cli(args: argparse.Namespace) -> int:
    result = run(args)
    c, m, s, p = result["config"], result["machine"], result["summary"], result["pipeline"]
    print(f"realign bench: {c['layers']} layers x 7 modules, r={c['rank']}, bf16, adapters "
          f"{result['adapters']['finetuned']['bytes'] / GB:.2f} GB each; method random (sparsity {c['sparsity']}), "
          f"adaptive selection; page cache {c['page_cache']}; {m['cpus']} CPUs, torch threads {m['torch_threads']}, "
          f"load avg {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")
    print(format_table(result))
    v = p["verify"]
    print(f"* timed part: {s['timed_seconds']:.2f} s = {s['timed_over_baseline']:.2f}x the baseline "
          f"({s['baseline_seconds']:.2f} s); load..write {s['end_to_end_seconds']:.2f} s = "
          f"{s['end_to_end_over_baseline']:.2f}x. Restored {p['restored']} of {p['modules']} modules; similarity "
          f"{p['similarity']['min']:.4f}..{p['similarity']['max']:.4f}.")
    print(f"verify: {'ok' if v['ok'] else 'FAILED'} on {v['modules_checked']} modules ({v['restored']} restored, "
          f"{v['unrestored']} unrestored, {v['masked_entries']} masked entries); {'; '.join(v['problems'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if v["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bench_realign_70b", description=__doc__.splitlines()[0])
    add_arguments(p)
    for name in ("--_child", "--_result", "--_out", "--_aligned", "--_finetuned", "--_reference"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        folders = {k: Path(getattr(args, f"_{k}")) for k in ("aligned", "finetuned", "reference")}
        result = _child(args._child, folders, Path(args._out), args)
        Path(args._result).write_text(json.dumps(result))
        return 0
    return run_cli(args)


def test_realign_70b_smoke(tmp_path: Path) -> None:
    """2 layers of the 70B geometry: both phases run in subprocesses and the output verifies on every module."""
    p = argparse.ArgumentParser()
    add_arguments(p, layers=2)
    args = p.parse_args(["--workdir", str(tmp_path), "--verify-modules", "0"])
    result = run(args)
    v = result["pipeline"]["verify"]
    assert v["ok"], v["problems"]
    assert v["modules_checked"] == result["pipeline"]["modules"] == 14
    assert 0 < result["pipeline"]["restored"] < 14
    assert set(TIMED) <= set(result["pipeline"]["stages"])
    assert result["summary"]["timed_seconds"] > 0
    assert "timed total" in format_table(result)


if __name__ == "__main__":
    raise SystemExit(main())
