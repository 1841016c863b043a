"""Tiny sharded checkpoints, adapters and calibration sets for the calibration tests (fp32, made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlsr_fast.calib import load_calibration
from nlsr_fast.io import CheckpointReader, LoraAdapter
from nlsr_fast.testing import make_lora_adapter, make_tiny_llama, write_calibration_jsonl


class Tiny:
    """A tiny model folder, its reference adapter folder, factors, tokenizer and calibration sets."""

    def __init__(self, root: Path, arch: str, layers: int = 3) -> None:
        from transformers import AutoTokenizer

        self.base = make_tiny_llama(root / f"{arch}_base", layers=layers, arch=arch, max_shard_size="20KB")
        self.adapter = make_lora_adapter(root / f"{arch}_adapter", self.base, r=4, alpha=8.0, std=0.2)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.layers = layers
        ad = LoraAdapter.load(self.adapter)
        # "amplified" reference: factors scaled like preset paper with alpha=0.9
        c = (1.9) ** 0.5
        self.factors = {n: (ad.factors(n)[0].float() * c, ad.factors(n)[1].float() * c, ad.scale(n))
                        for n in ad.modules}
        jsonl = write_calibration_jsonl(root / f"{arch}_calib.jsonl", n=10, seed=3)
        self.calib = load_calibration(jsonl, self.tokenizer, nsamples=10)
        pairs = write_calibration_jsonl(root / f"{arch}_pairs.jsonl", n=6, seed=4, pairs=True)
        self.pairs = load_calibration(pairs, self.tokenizer, nsamples=6, pairs=True)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.base)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    cache: dict[str, Tiny] = {}
    root = tmp_path_factory.mktemp("calib_models")

    def get(arch: str = "llama") -> Tiny:
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = Tiny(root, arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_factory) -> Tiny:
    return tiny_factory("llama")
