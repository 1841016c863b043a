"""Helpers shared by the io tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def load_peft(base: Path, adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (lora_A weight, lora_B weight, scaling)} as PEFT itself loads them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, os.fspath(adapter))
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            out[short] = (
                mod.lora_A["default"].weight.detach().clone(),
                mod.lora_B["default"].weight.detach().clone(),
                float(mod.scaling["default"]),
            )
    return out
