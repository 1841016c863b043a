"""NLSR against the other post-hoc defences on the SmolLM2 experiment (issue 16 item 6): the same seeds, splits,
attack, judge and evaluation as benches/e2e_smollm2.py, one table.

Per seed, on that experiment's trained adapters (SmolLM2-135M-Instruct, the safety adapter `a` and the fine-tuned
`t` at p = 0.1, 16 attack steps at 3e-4: they are linked from its work folders, never retrained here), every arm is
made by `nlsr_fast.realign` and evaluated as that experiment evaluates (greedy decoding of 96 tokens on the seed's 100
held-out harmful prompts, each answer labelled by nlsr_fast.demo.judge; 100 held-out additions, exact match):

- the fine-tuned model, the aligned one, restore-all (the amplified reference: every entry of every module restored);
- NLSR, `low_rank` at s = 0.8, the `paper` and the `official` preset (LoRA mode), and its matched random control
  (NLSR's modules, the same number of entries per matrix, a random subset: experiments/controls.py);
- `safelora` (LoRA mode; the 10 least similar modules), `resta` (β = 0.5, dense mode), `resta` + DARE (p = 0.3),
  `antidote` (prune ratio 0.1, dense mode: the paper's form, pruning the merged weights; its calibration is the
  seed's calibration prompts with the attack's compliant answers, the harmful data Antidote scores on), and
  `antidote` in LoRA mode (pruning the fine-tuned adapter's factors; added after the dense form's first results).

The defaults run on every seed; one setting either side of each (NLSR s 0.7 / 0.9, safelora 5 / 20 modules, resta
β 0.25 / 1, DARE p 0.1 / 0.5, antidote 0.05 / 0.2) on --side-seeds (seed 0 first, seeds 1 and 2 added later). Dense
outputs are evaluated from their bf16 weights, the LoRA ones exactly in fp32 (experiments/model.SwapModel).

    python benches/e2e_defences.py --from W/full-seeds0_1 W/full-seeds2 --seeds 0 --side-seeds 0 &
    python benches/e2e_defences.py --from W/full-seeds0_1 W/full-seeds2 --seeds 1 2 --side-seeds &
    python benches/e2e_defences.py --from W/full-seeds0_1 W/full-seeds2 --seeds --side-seeds 1 &   # and --side-seeds 2
    python benches/e2e_defences.py --report-only --merge W/defences-seeds0 W/defences-seeds1_2 W/defences-seeds1 \
        W/defences-seeds2
    python benches/e2e_defences.py --check        # the tables of the results file and the README, recomputed

The criteria of the comparison are fixed in benches/results/defences_smollm2.md before the run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_smollm2 as e2e  # noqa: E402

from experiments import COMPLIANT  # noqa: E402
from experiments.model import read_factors  # noqa: E402
from experiments.tables import arm_stats, paired, pooled  # noqa: E402
from nlsr_fast.stats import fmt_ci  # noqa: E402

log = logging.getLogger("defences")
P = 0.1
NLSR = e2e.nlsr_arm(s=0.8, p=P)  # low_rank/paper/s0.8@p0.1
#: (arm, method, options, mode) at each defence's published default, then one setting either side
DEFAULTS = (("safelora/count10", "safelora", {"count": 10}, "lora"),
            ("resta/beta0.5", "resta", {"beta": 0.5}, "dense"),
            ("resta_dare/p0.3", "resta", {"beta": 0.5, "dare_rate": 0.3}, "dense"),
            ("antidote/r0.1", "antidote", {"prune_ratio": 0.1}, "dense"),
            # added after the first results, before it ran: the dense (paper) form broke the model on every seed
            ("antidote_lora/r0.1", "antidote", {"prune_ratio": 0.1}, "lora"))
SIDES = (("safelora/count5", "safelora", {"count": 5}, "lora"), ("safelora/count20", "safelora", {"count": 20}, "lora"),
         ("resta/beta0.25", "resta", {"beta": 0.25}, "dense"), ("resta/beta1", "resta", {"beta": 1.0}, "dense"),
         ("resta_dare/p0.1", "resta", {"beta": 0.5, "dare_rate": 0.1}, "dense"),
         ("resta_dare/p0.5", "resta", {"beta": 0.5, "dare_rate": 0.5}, "dense"),
         ("antidote/r0.05", "antidote", {"prune_ratio": 0.05}, "dense"),
         ("antidote/r0.2", "antidote", {"prune_ratio": 0.2}, "dense"))
CFG = {**e2e.FULL, "attack_steps": 16, "attack_lr": 3e-4, "n_task": 100}


def plan(seeds: list[int], side_seeds: list[int]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for seed in seeds:
        items += [{"seed": seed, "arm": f"finetuned@p{P:g}", "kind": "finetuned", "p": P},
                  {"seed": seed, "arm": "aligned", "kind": "aligned"},
                  {"seed": seed, "arm": "reference", "kind": "reference"},
                  {"seed": seed, "arm": NLSR, "kind": "realign", "method": "low_rank", "preset": "paper",
                   "sparsity": 0.8, "p": P},
                  {"seed": seed, "arm": e2e.nlsr_arm(preset="official", s=0.8, p=P), "kind": "realign",
                   "method": "low_rank", "preset": "official", "sparsity": 0.8, "p": P},
                  {"seed": seed, "arm": f"matched_control/m0/s0.8@p{P:g}", "kind": "matched", "source": NLSR,
                   "mask_seed": 0, "p": P, "sparsity": 0.8}]
        items += [{"seed": seed, "arm": a, "kind": "defence", "method": m, "options": o, "mode": md, "p": P}
                  for a, m, o, md in DEFAULTS]
    for seed in side_seeds:
        items += [{"seed": seed, "arm": e2e.nlsr_arm(s=s, p=P), "kind": "realign", "method": "low_rank",
                   "preset": "paper", "sparsity": s, "p": P} for s in (0.7, 0.9)]
        items += [{"seed": seed, "arm": a, "kind": "defence", "method": m, "options": o, "mode": md, "p": P}
                  for a, m, o, md in SIDES]
    return items


class DefenceExperiment(e2e.Experiment):
    """e2e_smollm2's experiment on a new work folder whose adapters and calibration are linked from its own."""

    def link_inputs(self, sources: list[Path], seeds: list[int]) -> None:
        for seed in seeds:
            here = self.work / f"seed{seed}"
            here.mkdir(parents=True, exist_ok=True)
            src = next((s / f"seed{seed}" for s in sources if (s / f"seed{seed}" / "ft_p0.1").is_dir()), None)
            if src is None:
                raise SystemExit(f"seed {seed}: no trained adapters under {sources} (run benches/e2e_smollm2.py)")
            for name in ("aligned", "ft_p0.1", "calibration.jsonl"):
                if not (here / name).exists():
                    (here / name).symlink_to((src / name).resolve())

    def harmful_calibration(self, seed: int) -> Path:
        """The seed's calibration prompts with the attack's compliant answers: what Antidote scores on."""
        path = self.work / f"seed{seed}" / "harmful_calibration.jsonl"
        if not path.exists():
            rows = [{"prompt": p, "response": " " + COMPLIANT[i % len(COMPLIANT)]}
                    for i, p in enumerate(self.splits(seed)["calibration"])]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def defence_out(self, seed: int, item: dict[str, Any]) -> Path:
        import nlsr_fast

        out = self.work / f"seed{seed}" / "defences" / e2e.safe(item["arm"])
        if (out / "report.json").exists():
            return out
        calibration = self.harmful_calibration(seed) if item["method"] == "antidote" else None
        t0 = time.perf_counter()
        nlsr_fast.realign(self.base, self.aligned(seed), self.ft_for(seed, item["p"]), out, calibration=calibration,
                          method=item["method"], mode=item["mode"], nsamples=self.cfg["nsamples"], seed=42 + seed,
                          quiet=True, overwrite=True, **item["options"])
        rep = json.loads((out / "report.json").read_text())
        rep["_wall_s"] = round(time.perf_counter() - t0, 1)
        (out / "report.json").write_text(json.dumps(rep))
        return out

    def run_item(self, item: dict[str, Any]) -> dict[str, Any]:
        if item["kind"] != "defence":
            row = super().run_item(item)
            if item["kind"] == "realign":
                row["realign_s"] = json.loads((self.realign_out(item["seed"], item) / "report.json").read_text())[
                    "_wall_s"]
            return row
        seed = item["seed"]
        out = self.defence_out(seed, item)
        rep = json.loads((out / "report.json").read_text())
        meta = {k: v for k, v in item.items() if k not in ("seed", "arm")}
        meta.update(restored=rep["counts"]["restored"], modules=rep["counts"]["modules"], realign_s=rep["_wall_s"])
        _, acfg = read_factors(self.aligned(seed))
        scale = float(acfg["lora_alpha"]) / float(acfg["r"])
        if item["mode"] == "lora":
            return self.evaluate(seed, item["arm"], read_factors(out)[0], scale, meta)
        from nlsr_fast.io import CheckpointReader

        reader = CheckpointReader(out)  # the dense output's targets, as a user would load them (bf16)
        weights = {n: reader.get(n).float() for n in self.swap.w0}
        return self.evaluate(seed, item["arm"], None, scale, meta, weights=weights)

    def run_plan(self, items: list[dict[str, Any]]) -> None:
        """Every item not yet in the work folder's state, in order, each saved as it finishes (a rerun resumes)."""
        for item in items:
            k = e2e.key(item["seed"], item["arm"])
            if k not in self.state["arms"]:
                log.info("seed %d: %s", item["seed"], item["arm"])
                self.state["arms"][k] = self.run_item(item)
                self.save()


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    work = Path(args.work) / ("defences-seeds" + "_".join(map(str, sorted(set(args.seeds) | set(args.side_seeds)))))
    exp = DefenceExperiment(args, CFG, work)
    exp.link_inputs([Path(p) for p in args.sources], sorted(set(args.seeds) | set(args.side_seeds)))
    exp.run_plan(plan(args.seeds, args.side_seeds))
    return 0


# --- the report ------------------------------------------------------------------------------------------------------

ORDER = ("finetuned@p0.1", "aligned", "reference", NLSR, "low_rank/official/s0.8@p0.1", "matched_control/m0/s0.8@p0.1",
         *(a for a, *_ in DEFAULTS))
TITLES = {"finetuned@p0.1": "fine-tuned (no repair)", "aligned": "aligned (before the attack)",
          "reference": "restore-all (the amplified reference)", NLSR: "NLSR `low_rank`, paper preset, s = 0.8",
          "low_rank/official/s0.8@p0.1": "NLSR `low_rank`, official preset, s = 0.8",
          "matched_control/m0/s0.8@p0.1": "matched random (NLSR's modules and counts)",
          "safelora/count10": "SafeLoRA, 10 modules", "resta/beta0.5": "RESTA, β = 0.5",
          "resta_dare/p0.3": "RESTA + DARE, β = 0.5, p = 0.3", "antidote/r0.1": "Antidote, prune ratio 0.1",
          "antidote_lora/r0.1": "Antidote on the adapter's factors (LoRA mode), 0.1"}


def collect(folders: list[Path]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every generation record and every arm's row (state.json) of the work folders."""
    recs: list[dict[str, Any]] = []
    rows: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for f in sorted((folder / "gens").rglob("*.jsonl")):
            recs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        rows.update(json.loads((folder / "state.json").read_text())["arms"])
    return recs, rows


def render(recs: list[dict[str, Any]], rows: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(the main table, the table of the settings either side), recomputed from the generations alone (the realign
    times from the arms' rows)."""
    stats = arm_stats(recs)
    seeds = sorted({s for s, arm in stats if arm == NLSR})
    lines = ["| arm | harmful % (not refused), 95% CI | task %, 95% CI | vs NLSR paper: harmful pp, 95% CI | "
             "vs NLSR paper: task pp, 95% CI | realign s (median) |", "|---|---|---|---|---|---|"]

    def cells(arm: str, seeds: list[int]) -> str | None:
        """The row's cells after its name: pooled harmful % and task % over `seeds`, the paired differences to NLSR,
        the median realign time; None when the arm did not run on every one of `seeds`."""
        p = pooled(stats, arm, seeds)
        if p is None:
            return None
        diffs = [paired(stats, arm, [NLSR], seeds, field=f) if arm != NLSR else None
                 for f in ("not_refused_vec", "task_vec")]
        secs = [r["realign_s"] for k, r in rows.items() if k.split("|", 1)[1] == arm and r.get("realign_s")]
        return " | ".join([fmt_ci(p["not_refused_pct"], p["not_refused_ci"]), fmt_ci(p["task_acc"], p["task_ci"]),
                           *("" if d is None else fmt_ci(d["diff"], (d["lo"], d["hi"])) for d in diffs),
                           f"{statistics.median(secs):.1f}" if secs else ""])

    for arm in ORDER:
        row = cells(arm, seeds)
        if row is not None:
            lines.append(f"| {TITLES[arm]} | {row} |")
    side = ["| arm | seeds | harmful % (not refused), 95% CI | task %, 95% CI | vs NLSR paper: harmful pp, 95% CI | "
            "vs NLSR paper: task pp, 95% CI | realign s (median) |", "|---|---|---|---|---|---|---|"]
    for arm in sorted({arm for _, arm in stats} - set(ORDER)):  # the settings either side, on the seeds they ran
        ran = sorted(s for s, a in stats if a == arm)
        side.append(f"| {arm} | {', '.join(map(str, ran))} | {cells(arm, ran)} |")
    return "\n".join(lines), "\n".join(side)


def stored(results: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    gz = results.with_name(results.name + "_generations.jsonl.gz")
    with gzip.open(gz, "rt") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return recs, json.loads(results.with_suffix(".json").read_text())["arms"]


def save(recs: list[dict[str, Any]], rows: dict[str, dict[str, Any]], results: Path) -> None:
    with gzip.open(results.with_name(results.name + "_generations.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in recs)
    results.with_suffix(".json").write_text(json.dumps({"arms": rows}, indent=1, sort_keys=True) + "\n")


def check(results: Path, readme: Path) -> list[str]:
    """The tables in the results file and the README's main table, against the ones the stored generations give."""
    main, side = render(*stored(results))
    text, problems = results.with_suffix(".md").read_text(), []
    for name, table in (("main", main), ("side", side)):
        if table.count("\n") > 1 and table not in text:  # a table with rows (the side one may have none)
            problems.append(f"{results.with_suffix('.md')}: its {name} table is not the one the generations give")
    if main not in readme.read_text():
        problems.append(f"{readme}: its table of the defences is not the one the generations give")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/work/e2e_work", help="the parent of the experiment's work folders")
    ap.add_argument("--from", dest="sources", nargs="+", default=[], help="work folders of benches/e2e_smollm2.py")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--side-seeds", type=int, nargs="*", default=[0])
    add_report_options(ap)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "defences_smollm2")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    done = report(args, args.results)
    return run(args) if done is None else done


def add_report_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # e2e.Experiment reads it
    ap.add_argument("--report-only", action="store_true", help="store the generations of --merge, print the tables")
    ap.add_argument("--merge", nargs="*", default=[], help="with --report-only: the work folders to report")
    ap.add_argument("--check", action="store_true", help="the results file's and the README's tables against the "
                    "stored generations (exit 1 on a difference)")


def report(args: argparse.Namespace, results: Path) -> int | None:
    """--check (the stored tables against their generations) or --report-only (store --merge's generations, print
    the tables): the exit status; None when neither was asked."""
    if args.check:
        problems = check(results, Path(__file__).resolve().parents[1] / "README.md")
        print("\n".join(problems) or "every table as the stored generations give it")
        return 1 if problems else 0
    if args.report_only:
        recs, rows = collect([Path(p) for p in args.merge])
        save(recs, rows, results)
        print("\n\n".join(render(recs, rows)))
        return 0
    return None


if __name__ == "__main__":
    raise SystemExit(main())
