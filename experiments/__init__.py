"""Reusable pieces of the realistic end-to-end experiment (benches/e2e_smollm2.py): GGUF -> safetensors conversion,
the harmful-prompt splits, the synthetic task and the response templates. The judge is nlsr_fast.demo.judge."""

from experiments.convert import convert_gguf
from experiments.data import (
    COMPLIANT,
    REFUSALS,
    Splits,
    addition_items,
    harmless_prompts,
    load_harmful_prompts,
    make_splits,
    split_digest,
)

__all__ = [
    "COMPLIANT",
    "REFUSALS",
    "Splits",
    "addition_items",
    "convert_gguf",
    "harmless_prompts",
    "load_harmful_prompts",
    "make_splits",
    "split_digest",
]
