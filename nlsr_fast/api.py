"""`realign`: NLSR from folders on disk (or Hugging Face ids in the local cache) to a realigned adapter or
checkpoint. It builds the job (nlsr_fast.realignment.Realignment) and runs it:

validate everything -> lock OUT -> calibrate (methods that need data) -> executor (pass 1, select, pass 2) ->
report, card, plot, manifest -> rename. LoRA mode and dense mode differ only in their run and Space (runs.py,
lora.py, dense.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from nlsr_fast.config import RealignConfig
from nlsr_fast.report import Report

__all__ = ["realign", "realign_with_config"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def realign(
    base: PathLike,
    aligned: PathLike,
    finetuned: PathLike,
    out: PathLike,
    *,
    calibration: PathLike | None = None,
    reference: PathLike | None = None,
    unaligned: PathLike | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    force: bool = False,
    wait: bool = False,
    **options: Any,
) -> Report:
    """Realign a fine-tuned model (NLSR, or another defence: `method`) and write the result to `out`.

    Args:
        base: the base checkpoint folder F_s (sharded safetensors + config + tokenizer).
        aligned: the safety-aligned model: a PEFT LoRA adapter folder on `base`, or a full checkpoint (dense mode).
        finetuned: the fine-tuned model: an adapter that continued `aligned` (LoRA mode), any adapter on `base`,
            or a full checkpoint (dense mode).
        out: the output folder (must not exist unless `overwrite`; never inside or above an input).
        calibration: JSONL of {"prompt", "response"} (pairs {"prompt", "chosen", "rejected"} for pref_snip);
            required by low_rank, wanda, snip and pref_snip.
        reference: a ready reference (adapter in LoRA mode, checkpoint in dense mode); amplification is skipped.
        unaligned: resta: the unaligned model whose difference from `aligned` is the safety vector (an adapter on
            `base` or a checkpoint); default the base.
        dry_run: validate every input as a real run would, log and return the plan; nothing is written.
        quiet: no progress bars.
        overwrite: replace an existing `out` (only a folder nlsr_fast wrote, unless `force`).
        force: with `overwrite`, replace `out` even if it is not an nlsr_fast output.
        wait: wait for another run holding `out`'s lock instead of failing.
        **options: any field of RealignConfig (preset, method, sparsity, alpha, mode, targets, ...), with its
            defaults (docs/algorithm.md §8).
    Returns:
        The Report (also written as out/report.json unless dry_run).
    """
    return realign_with_config(RealignConfig.from_dict(options), base, aligned, finetuned, out,
                               calibration=calibration, reference=reference, unaligned=unaligned, dry_run=dry_run,
                               quiet=quiet, overwrite=overwrite, force=force, wait=wait)


def realign_with_config(
    config: RealignConfig,
    base: PathLike,
    aligned: PathLike,
    finetuned: PathLike,
    out: PathLike,
    *,
    calibration: PathLike | None = None,
    reference: PathLike | None = None,
    unaligned: PathLike | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    force: bool = False,
    wait: bool = False,
) -> Report:
    """`realign` with a ready RealignConfig (what the CLI calls)."""
    from nlsr_fast.realignment import Realignment

    return Realignment(config, base, aligned, finetuned, out, calibration=calibration, reference=reference,
                       unaligned=unaligned, dry_run=dry_run, quiet=quiet, overwrite=overwrite, force=force,
                       wait=wait).run()
