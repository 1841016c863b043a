"""antidote: prune (zero) the fine-tuned weights that matter most on harmful data (Huang et al. 2024).

Scores are wanda's, |W_t| x the root mean square of the entry's input, taken on the fine-tuned model's own forward
over the harmful calibration responses; the top prune_ratio of each row is zeroed in every module (docs/algorithm.md
§10). In LoRA mode the entries are the fine-tuned adapter's factors (A_t by its inputs, B_t by A_t's outputs).
"""

from __future__ import annotations

from nlsr_fast.methods import wanda
from nlsr_fast.methods.base import Method, Needs

METHOD = Method(
    name="antidote",
    title="Antidote",
    reference="https://arxiv.org/abs/2408.09600",
    summary="|W_t| × norm of its input in the fine-tuned model, on harmful calibration data",
    modes=("lora", "dense"),
    needs=Needs.STATISTICS,
    repair="prune",
    calibrate_on="finetuned",
    selections=("all",),
    options=("prune_ratio",),
    defaults={"prune_ratio": 0.1},  # the released scripts' dense_ratio
    share="prune_ratio",
    lora_masks=wanda.lora_masks,
    col_scale=wanda.input_scale,
)
