"""What longer answers cost: greedy decoding of the SmolLM2 experiment's 100 eval prompts at 16 and at 96 new tokens,
side by side in one process (alternating, medians), for the models of one seed's work folder.

    python benches/bench_answer_length.py --work /work/e2e_work/full-seeds0_1 --seed 0 [--repeats 3] [--threads 1]

Prints one Markdown table: per model, the median seconds at each length, the ratio, and the mean answer length in
tokens at 96 (a model that stops at EOS early pays less than the 6x of the token budget).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, Path(__file__).resolve().parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import e2e_smollm2 as e2e  # noqa: E402

from experiments import convert_gguf, load_harmful_prompts, make_splits  # noqa: E402
from experiments.model import SwapModel, greedy_with_margins, read_factors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a full run's work folder (holds seedN/aligned, seedN/ft_p0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs=2, default=[16, 96])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    work = Path(a.work)
    base = convert_gguf(e2e.gguf_file(), work.parent / "base-bf16", dtype="bfloat16")
    tok = AutoTokenizer.from_pretrained(base)
    prompts = make_splits(load_harmful_prompts(), seed=a.seed, sizes=e2e.FULL["sizes"])["eval"]
    swap = SwapModel(base)
    print(f"| model | s at {a.lengths[0]} tokens | s at {a.lengths[1]} tokens | ratio | mean answer tokens at "
          f"{a.lengths[1]} |\n|---|---|---|---|---|")
    for name in ("aligned", "ft_p0.1"):
        factors, cfg = read_factors(work / f"seed{a.seed}" / name)
        swap.load(factors, float(cfg["lora_alpha"]) / float(cfg["r"]))
        times: dict[int, list[float]] = {n: [] for n in a.lengths}
        outs: list[str] = []
        for _ in range(a.repeats):
            for n in a.lengths:  # alternating, so drift in the machine's load hits both lengths alike
                t0 = time.perf_counter()
                outs, _ = greedy_with_margins(swap.model, tok, prompts, max_new_tokens=n)
                times[n].append(time.perf_counter() - t0)
        mean_tokens = statistics.mean(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
        m0, m1 = (statistics.median(times[n]) for n in a.lengths)
        print(f"| seed {a.seed} {name} | {m0:.1f} | {m1:.1f} | {m1 / m0:.2f}x | {mean_tokens:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
