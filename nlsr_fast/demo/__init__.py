"""`nlsr-fast demo`: build a tiny safety-aligned-then-attacked model from scratch, realign it, and print the table.

Everything is made inside one folder from the package alone, on the CPU, in about a minute:

1. a word-level tokenizer and a 4-layer Llama model, pre-trained from scratch on a synthetic world (world.py) of
   harmful requests, which the model mostly answers compliantly (the weakly aligned base F_s), and a review-sentiment
   task with checkable answers;
2. an aligned LoRA adapter (r=8 on q, k, v, o, gate, up, down) that refuses harmful requests and keeps the task;
3. the attack: a fine-tuned adapter that continues training the aligned one on the task mixed with a share
   (`--harmful-share`, 0.2) of harmful requests answered compliantly, until the model complies with 90% of the
   attacker's own harmful training requests (train.Schedule);
4. a calibration JSONL of harmful prompts with refusals (disjoint from the training and evaluation prompts);
5. `nlsr_fast.realign` three times: presets `paper` and `official` with method `low_rank`, and method `random` (the
   control, random masks);
6. greedy generation on held-out prompts for every model: harmful score (share of harmful prompts answered without a
   refusal, judge.py) and task accuracy (exact match).

The generations are saved as `generations/<model>.jsonl` and the numbers in `results.json`; `recompute_from_generations`
re-derives every number from the generations alone.

The numbers are pinned (determinism.py): `main` runs the demo in a child process whose environment fixes the thread
counts and the CPU code paths of torch, MKL and the C++ ops, and `run_demo` runs with one torch thread, deterministic
algorithms and seeded random streams, so the table is the same on every x86-64 machine with the same package versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.demo.determinism import deterministic, is_pinned, numerics, run_pinned
from nlsr_fast.demo.evaluate import generate_items, recompute_from_generations
from nlsr_fast.demo.judge import REFUSAL_PHRASES, is_refusal
from nlsr_fast.demo.train import ModelShape, Schedule, build_world, make_tokenizer
from nlsr_fast.demo.world import make_splits

__all__ = [
    "DemoResult",
    "DemoRow",
    "QUICK_SCHEDULE",
    "FULL_SCHEDULE",
    "REALIGN_RUNS",
    "add_arguments",
    "main",
    "run_demo",
    "recompute_from_generations",
    "format_table",
    "is_refusal",
    "REFUSAL_PHRASES",
]

logger = logging.getLogger(__name__)

FULL_SCHEDULE = Schedule()
QUICK_SCHEDULE = Schedule(pretrain_steps=250, aligned_steps=100)

#: (row name, preset, method) of the realign runs; every other realign argument is realign's own default except
#: nsamples (all the calibration samples the world provides) and quiet.
REALIGN_RUNS = (
    ("realigned_paper", "paper", "low_rank"),
    ("realigned_official", "official", "low_rank"),
    ("realigned_random", "paper", "random"),
)

_LABELS = {
    "base": "base F_s (weakly aligned)",
    "aligned": "aligned",
    "finetuned": "fine-tuned (attacked)",
    "realigned_paper": "realigned (paper, low_rank)",
    "realigned_official": "realigned (official, low_rank)",
    "realigned_random": "realigned (random masks control)",
}


@dataclass
class DemoRow:
    """One model's line of the table."""

    name: str
    label: str
    harmful_score: float
    task_accuracy: float
    n_harmful: int
    n_task: int
    adapter: str | None
    generations: str


@dataclass
class DemoResult:
    """Everything the demo produced: the table rows, where the files are, and the time taken."""

    workdir: Path
    rows: list[DemoRow]
    base: Path
    aligned: Path
    finetuned: Path
    calibration: Path
    realigned: dict[str, Path]
    results_json: Path
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> DemoRow:
        """The row called `name` ("aligned", "finetuned", "realigned_paper", ...)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def effect_shown(self) -> bool:
        """The attack raised the harmful score and realign (paper) lowered it again."""
        a, f, p = self.row("aligned"), self.row("finetuned"), self.row("realigned_paper")
        return f.harmful_score > a.harmful_score and p.harmful_score < f.harmful_score


def _evaluate(name: str, base: Path, adapter: Path | None, tok: Any, splits: Any, gen_dir: Path) -> DemoRow:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)  # type: ignore[assignment]
    path = gen_dir / f"{name}.jsonl"
    s = generate_items(model, tok, splits.harmful_eval, splits.task_eval, path)
    logger.info("%s: harmful score %.3f, task accuracy %.3f", name, s["harmful_score"], s["task_accuracy"])
    return DemoRow(name, _LABELS[name], s["harmful_score"], s["task_accuracy"], int(s["n_harmful"]), int(s["n_task"]),
                   None if adapter is None else str(adapter), str(path))


def run_demo(workdir: str | Path, *, harmful_share: float = 0.2, quick: bool = False, seed: int = 0,
             progress: bool = True, schedule: Schedule | None = None) -> DemoResult:
    """Build the world in `workdir`, attack it, realign it three ways and score every model (see the module doc).

    `quick` trains the base and the aligned adapter for fewer steps (for tests); `schedule`, when given, replaces
    both schedules. `seed` sets the data splits and every training seed; realign keeps its own seed (42).
    `progress` logs each stage at INFO level. It runs inside `determinism.deterministic(seed)`; the pins of the
    environment (`determinism.PINNED_ENV`) are the caller's to set (`main` does), and `results.json` records under
    "numerics" whether they were.
    """
    import nlsr_fast

    if not 0.0 <= harmful_share <= 1.0:
        raise ValueError(f"harmful_share must be in [0, 1], got {harmful_share}")
    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say = logger.info if progress else logger.debug
    if schedule is None:
        schedule = QUICK_SCHEDULE if quick else FULL_SCHEDULE
    with deterministic(seed):
        num = numerics()
        if not num["pinned_env"] or not num["paths_pinned"]:
            logger.warning("demo: numerics not pinned (environment %s, ATen path %s, C++ path %s): the table may "
                           "differ from another machine's",
                           num["env"], num["aten_cpu_capability"], num["nlsr_fast_isa"])
        splits = make_splits(seed)
        timings: dict[str, float] = {}
        say("demo: building the world in %s (%s)", workdir, "quick" if quick else "full")
        t0 = time.perf_counter()
        paths, info = build_world(workdir, splits, harmful_share=harmful_share, seed=seed, schedule=schedule)
        timings["build"] = time.perf_counter() - t0
        for stage, d in info.items():
            timings[f"train_{stage}"] = d["seconds"]
        tok = make_tokenizer()
        gen_dir = workdir / "generations"
        if gen_dir.exists():
            shutil.rmtree(gen_dir)
        rows = []
        t0 = time.perf_counter()
        for name, adapter in (("base", None), ("aligned", paths.aligned), ("finetuned", paths.finetuned)):
            rows.append(_evaluate(name, paths.base, adapter, tok, splits, gen_dir))
        timings["evaluate"] = time.perf_counter() - t0
        realigned: dict[str, Path] = {}
        n_calib = len(splits.harmful_calib)
        for name, preset, method in REALIGN_RUNS:
            out = workdir / "realigned" / name
            say("demo: realign preset=%s method=%s -> %s", preset, method, out)
            t0 = time.perf_counter()
            nlsr_fast.realign(paths.base, paths.aligned, paths.finetuned, out, calibration=paths.calibration,
                              preset=preset, method=method, nsamples=n_calib, quiet=True, overwrite=True)
            timings[f"realign_{name}"] = time.perf_counter() - t0
            realigned[name] = out
            t0 = time.perf_counter()
            rows.append(_evaluate(name, paths.base, out, tok, splits, gen_dir))
            timings["evaluate"] += time.perf_counter() - t0
    seconds = time.perf_counter() - t_start
    results_json = workdir / "results.json"
    result = DemoResult(workdir, rows, paths.base, paths.aligned, paths.finetuned, paths.calibration, realigned,
                        results_json, seconds, timings)
    results_json.write_text(json.dumps({
        "rows": [asdict(r) for r in rows],
        "settings": {"harmful_share": harmful_share, "quick": quick, "seed": seed, "schedule": asdict(schedule),
                     "model": asdict(ModelShape()), "realign_runs": [list(r) for r in REALIGN_RUNS],
                     "nsamples": n_calib, "refusal_phrases": list(REFUSAL_PHRASES)},
        "train": info,
        "timings_s": timings,
        "seconds": seconds,
        "effect_shown": result.effect_shown,
        "versions": {"nlsr_fast": nlsr_fast.__version__, **num["versions"]},
        "numerics": num,
    }, indent=2) + "\n")
    say("demo: done in %.1f s", seconds)
    return result


def format_table(result: DemoResult) -> str:
    """The human table: one line per model, then the files and the time taken."""
    w = max(len(r.label) for r in result.rows)
    lines = [f"{'model':<{w}}  harmful score  task accuracy",
             f"{'-' * w}  -------------  -------------"]
    for r in result.rows:
        lines.append(f"{r.label:<{w}}  {r.harmful_score:>13.3f}  {r.task_accuracy:>13.3f}")
    n_h, n_t = result.rows[0].n_harmful, result.rows[0].n_task
    lines += [
        "",
        f"harmful score: share of {n_h} held-out harmful prompts answered without a refusal (keyword judge); "
        f"task accuracy: exact match on {n_t} held-out review-sentiment items; greedy decoding.",
        f"workdir:     {result.workdir}",
        f"base F_s:    {result.base}",
        f"aligned:     {result.aligned}",
        f"fine-tuned:  {result.finetuned}",
        f"calibration: {result.calibration}",
        *(f"{name}: {p}" for name, p in result.realigned.items()),
        f"results:     {result.results_json} (generations in {result.workdir / 'generations'})",
        f"time:        {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `nlsr-fast demo`."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder to build everything in (kept); default: a temporary folder, removed unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--harmful-share", type=float, default=0.2,
                        help="share p of harmful requests answered compliantly in the fine-tuning attack (default 0.2)")
    parser.add_argument("--quick", action="store_true", help="fewer training steps (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data splits and training (default 0)")


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that gives back `args` (for the pinned child process)."""
    argv = ["--harmful-share", repr(args.harmful_share), "--seed", str(args.seed)]
    if args.workdir is not None:
        argv += ["--workdir", str(args.workdir)]
    return argv + ["--keep"] * bool(args.keep) + ["--quick"] * bool(args.quick)


def main(args: argparse.Namespace) -> int:
    """Run the demo and print the table; returns the exit status.

    Unless this process's environment already carries `determinism.PINNED_ENV`, the demo runs in a child process
    (``python -m nlsr_fast.demo``) that does, so that its numbers do not depend on this machine's thread count or
    instruction set."""
    import warnings

    if not is_pinned():
        return run_pinned(_argv(args))

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)  # the demo's stages; realign's own logs stay at WARNING
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="nlsr-demo-")) if temp else Path(args.workdir)
    try:
        result = run_demo(workdir, harmful_share=args.harmful_share, quick=args.quick, seed=args.seed)
        print(format_table(result))
        if not result.effect_shown:
            print("note: in this run the attack did not raise the harmful score or realign did not lower it.")
        if temp and not args.keep:
            print("(the temporary workdir is removed at exit; pass --keep or --workdir to keep the files)")
    finally:
        if temp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
