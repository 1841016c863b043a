"""Stage 4: the output folder: the realigned adapter, its masks, the report, the plot and a model card."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nlsr_fast.ops import PackedMask, save_masks

__all__ = ["MASKS_FILE", "REPORT_FILE", "PLOT_FILE", "CARD_FILE", "MasksFile", "folder_bytes", "mask_tensors",
           "output_tensors", "write_card", "write_masks"]

log = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
REPORT_FILE = "report.json"
PLOT_FILE = "similarity.png"
CARD_FILE = "README.md"


def output_tensors(ft: Any, new_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   changed: set[str]) -> dict[str, torch.Tensor]:
    """Every raw tensor of the fine-tuned adapter `ft` (io.LoraAdapter), with the factors of `changed` replaced.

    Unchanged modules and extra tensors are `ft.raw(key)` as stored (bit-identical, same dtype).
    """
    replaced: dict[str, torch.Tensor] = {}
    for name in changed:
        a, b = new_factors[name]
        replaced.update(ft.to_raw(name, a.cpu(), b.cpu()))
    return {key: replaced[key] if key in replaced else ft.raw(key) for key in ft.raw_keys}


def mask_tensors(masks: Mapping[str, tuple[PackedMask, PackedMask]]) -> dict[str, PackedMask]:
    """{'<module>.lora_A': mask_A, '<module>.lora_B': mask_B}, on the CPU."""
    out: dict[str, PackedMask] = {}
    for name, (mask_a, mask_b) in masks.items():
        out[f"{name}.lora_A"] = mask_a.to("cpu")
        out[f"{name}.lora_B"] = mask_b.to("cpu")
    return out


def write_masks(path: str | os.PathLike[str], masks: Mapping[str, tuple[PackedMask, PackedMask]]) -> None:
    """masks.safetensors: the reference masks, 1 bit per entry (nlsr_fast.ops.load_masks reads them back)."""
    save_masks(path, mask_tensors(masks))


class MasksFile:
    """masks.safetensors written mask by mask as pass 1 makes them, and read back one module at a time in pass 2.

    Its layout is `ops.packed_mask.masks_plan`'s, as `save_masks`'s is, so the file equals what `save_masks` writes for
    the same masks whatever order, or process, writes them.

    Args:
        path: the file.
        shapes: {mask name: logical shape}.
        create: plan and size the file (False: open one another process created).
    """

    def __init__(self, path: str | os.PathLike[str], shapes: Mapping[str, tuple[int, ...]], *,
                 create: bool = True) -> None:
        from nlsr_fast.io.stream import PlannedSafetensors
        from nlsr_fast.ops.packed_mask import masks_plan

        self.path = Path(path)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.planned = PlannedSafetensors(self.path, *masks_plan(self.shapes), create=create)
        self._infos: dict[str, Any] | None = None

    def write(self, name: str, mask: PackedMask) -> None:
        self.planned.write(name, mask.bits)

    def read(self, names: list[str]) -> dict[str, PackedMask]:
        """The masks `names`, read into private memory (no mapping of the whole file is kept)."""
        from nlsr_fast.io import read_header
        from nlsr_fast.io.stream import read_tensor

        if self._infos is None:
            self._infos = read_header(self.path)[0]
        return {n: PackedMask(read_tensor(self._infos[n]), self.shapes[n]) for n in names}

    def close(self) -> None:
        self.planned.close()


def write_card(path: str | os.PathLike[str], *, base_model: str | None, report: Any) -> None:
    """README.md model card with YAML front matter (base_model, library_name: peft, tags)."""
    cfg = report.config
    plotted = (Path(path).parent / PLOT_FILE).is_file()
    front = ["---"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front += ["library_name: peft", "tags:", "- nlsr", "- safety-realignment", "- lora", "---", ""]
    restored = report.counts.get("restored", 0)
    modules = report.counts.get("modules", 0)
    body = [
        "# Safety-realigned LoRA adapter",
        "",
        "This adapter is a fine-tuned LoRA adapter whose safety-critical neurons were restored from a safety",
        "reference with NLSR (Yi et al., *Neuron-Level Safety Realignment of Large Language Models Against Harmful",
        "Fine-Tuning*, AAAI 2025, arXiv 2412.12497), using nlsr_fast "
        f"{report.versions.get('nlsr_fast', '')}.",
        "",
        f"- preset `{cfg.get('preset')}`, method `{cfg.get('method')}`, sparsity {cfg.get('sparsity')}, "
        f"alpha {cfg.get('alpha')}",
        f"- selection `{cfg.get('selection')}` (prune rate {cfg.get('prune_rate')}, epsilon {cfg.get('epsilon')}, "
        f"seed {cfg.get('seed')})",
        f"- restored {restored} of {modules} modules; `report.json` lists every module, `masks.safetensors` holds",
        "  the masks" + (" and `similarity.png` plots the per-module similarity." if plotted else "."),
        "",
        "Load it with PEFT on its base model:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_model or '<base model>')})",
        "model = PeftModel.from_pretrained(base, \"<this folder>\")",
        "```",
        "",
    ]
    Path(path).write_text("\n".join(front + body), encoding="utf-8")


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the regular files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
