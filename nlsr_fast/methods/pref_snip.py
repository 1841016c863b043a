"""pref_snip: snip with a DPO loss of the reference against the base on preference pairs (NLSR's preference score)."""

from __future__ import annotations

from nlsr_fast.methods import snip
from nlsr_fast.methods.base import Method, Needs

METHOD = Method(
    name="pref_snip",
    title="preference snip",
    reference="https://arxiv.org/abs/2412.12497",
    summary="as `snip`, with a DPO loss against the base",
    modes=("lora",),
    refused={"dense": "it would need two full models' forwards and a backward per pair"},
    needs=Needs.PAIRS,
    loss="dpo",
    lora_masks=snip.lora_masks,
)
