"""magnitude: |W_e - W_0|, how far the reference moved each entry from the base; no data (dense mode)."""

from __future__ import annotations

from nlsr_fast.methods.base import Method, Needs

METHOD = Method(
    name="magnitude",
    title="magnitude",
    reference="https://arxiv.org/abs/2306.01708",
    summary="|W_e − W_0|, the reference's change from the base",
    modes=("dense",),
    refused={"lora": "a LoRA factor has no change from the base to rank"},
    needs=Needs.NONE,
)
