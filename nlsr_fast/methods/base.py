"""What a realignment method declares: one frozen `Method` per method, in one list (nlsr_fast.methods.METHODS).

Validation, the CLI's choices and help, the dry run's plan, calibration, the executor's mask step, the report and
the documentation's Methods table all read these fields; no other file lists method names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["LoraMasks", "Method", "Needs", "MODES", "REPAIRS"]

#: The two modes of a run (docs/algorithm.md §1).
MODES = ("lora", "dense")
#: What a method does to the modules it chooses (Method.repair).
REPAIRS = ("restore", "prune", "project", "add")


class Needs(str, Enum):
    """The calibration a method's score needs (docs/algorithm.md §3)."""

    NONE = "nothing"
    STATISTICS = "calibration"  # a forward pass: Grams, squared inputs
    GRADIENTS = "calibration (gradients)"  # a forward and a backward pass
    PAIRS = "preference pairs"  # gradients of a preference loss


#: The masks of one LoRA module from its reference factors and what calibration gave for it:
#: (A_e (r, d_in), B_e (d_out, r), calibration entry or None, sparsity, preset, mask keys, seed, backend) -> masks.
LoraMasks = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class Method:
    """One realignment method.

    Attributes:
        name: the value of `method=` / `--method`.
        title: a short name for tables.
        reference: where it comes from (a paper's URL).
        summary: its score of an entry, in one line (CLI help, the Methods table).
        modes: the modes it runs in, of MODES.
        refused: {mode: why} for each mode it does not run in (error messages, docs).
        needs: the calibration it needs.
        group: what one mask ranks: "row" (the top 1-s of each row) or "matrix" (of each whole factor).
        repair: what it does to the modules it chooses: "restore" (masked entries take the reference's values),
            "prune" (masked entries become zero) or "project" (the module's fine-tuning change is replaced by its
            projection on the aligned change; its masks mark every entry) or "add" (every module gets the safety
            vector; its masks mark the entries of the fine-tuning change it keeps).
        calibrate_on: the model whose forward pass calibration runs: "reference" (NLSR's scores) or "finetuned"
            (Antidote scores the fine-tuned model's own weights).
        selections: the module selections it allows (config.SELECTIONS); the first is its default.
        options: the config options of this method alone (prune_ratio, beta, dare_rate); refused for the others.
        defaults: {config option: value} the method gives an option left unset (its paper's defaults).
        share: the config option that sets a mask's share: "sparsity" (a mask keeps the top 1 - s) or
            "prune_ratio" (a mask marks the top prune_ratio share, the entries pruned).
        sequential: whether --sequential recomputes each layer with its masked or projected factors.
        loss: the loss whose gradients score entries ("nll", "dpo"), for gradient methods.
        draw: for a method whose mask is a seeded draw, not a ranking of scores: draw(x, sparsity=, seed=, key=,
            backend=) -> the mask of tensor x under mask key `key`.
        lora_masks: the per-module mask function of LoRA mode.
        col_scale: for a statistics method in dense mode, the per-input-column factor of its score from the summed
            squared inputs: col_scale(x_sq (d_in,), n_samples) -> (d_in,) fp32.
        project: for a sequential method, the factors that recompute a layer's outputs and the masks, from the
            module's statistics; None: the masked factors.
    """

    name: str
    title: str
    reference: str
    summary: str
    modes: tuple[str, ...]
    needs: Needs
    group: str = "row"
    repair: str = "restore"
    calibrate_on: str = "reference"
    selections: tuple[str, ...] = ("adaptive", "threshold", "fraction", "count", "all")
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    share: str = "sparsity"
    sequential: bool = False
    loss: str | None = None
    draw: Callable[..., Any] | None = None
    refused: Mapping[str, str] = field(default_factory=dict)
    lora_masks: LoraMasks | None = None
    project: Callable[..., tuple[tuple[Any, Any], tuple[Any, Any]]] | None = None
    col_scale: Callable[[Any, int], Any] | None = None

    def __post_init__(self) -> None:
        if set(self.modes) - set(MODES) or not self.modes:
            raise ValueError(f"method {self.name}: modes must be a non-empty subset of {MODES}, got {self.modes}")
        if set(self.refused) != set(MODES) - set(self.modes):
            raise ValueError(f"method {self.name}: give a reason for each mode it does not support")
        if (self.loss is not None) != (self.needs in (Needs.GRADIENTS, Needs.PAIRS)):
            raise ValueError(f"method {self.name}: a loss goes with gradient calibration and only with it")
        if self.repair not in REPAIRS or self.calibrate_on not in ("reference", "finetuned"):
            raise ValueError(f"method {self.name}: repair must be one of {REPAIRS} and calibrate_on 'reference' or "
                             f"'finetuned', got {self.repair!r}, {self.calibrate_on!r}")
        if self.share not in ("sparsity", "prune_ratio") or not self.selections:
            raise ValueError(f"method {self.name}: share must be 'sparsity' or 'prune_ratio', with a selection")

    def record(self) -> dict[str, Any]:
        """What report.json says of the method."""
        return {"name": self.name, "title": self.title, "reference": self.reference, "needs": self.needs.value,
                "group": self.group, "repair": self.repair, "calibrate_on": self.calibrate_on, "share": self.share}

    def mask_sparsity(self, sparsity: float, prune_ratio: float | None) -> float:
        """The s of the mask functions (a mask keeps the top 1 - s): the run's sparsity, or 1 - prune_ratio for a
        method whose mask marks the pruned share."""
        if self.share == "prune_ratio":
            assert prune_ratio is not None, f"method {self.name} needs prune_ratio"
            return 1.0 - float(prune_ratio)
        return float(sparsity)

    @property
    def needs_calibration(self) -> bool:
        return self.needs is not Needs.NONE

    @property
    def gradients(self) -> bool:
        return self.needs in (Needs.GRADIENTS, Needs.PAIRS)

    @property
    def splits_samples(self) -> bool:
        """Calibration is data-parallel under torchrun: its forward statistics are fp64 sums over samples, which
        processes can split. Gradient scores are not split: their fp32 sums would round differently (and the
        official preset's running sum depends on the sample order)."""
        return self.needs is Needs.STATISTICS
