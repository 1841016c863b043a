"""tests/pipeline fixtures: a tiny sharded Llama world on disk, made once per session (CONTRIBUTING.md rule T7)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nlsr_fast import testing


@dataclass(frozen=True)
class World:
    root: Path
    base: Path  # 2 layers, hidden 32, several shards
    aligned: Path  # r = 4 on the seven projections
    finetuned: Path  # continued `aligned`: layer 1's MLP and every q_proj drift, the rest bit-identical
    calibration: Path  # 24 {"prompt", "response"}
    pairs: Path  # 12 {"prompt", "chosen", "rejected"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    base = testing.make_tiny_llama(root / "base", layers=2, hidden=32, max_shard_size="20KB")
    assert len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(base.glob("*.safetensors"))) > 1, "the base must be sharded"
    aligned = testing.make_lora_adapter(root / "aligned", base, r=4, alpha=8.0, seed=1)
    finetuned = testing.continue_lora_adapter(
        root / "finetuned", aligned, seed=2, std=0.05, drift_modules=["layers.1.mlp", "q_proj"]
    )
    calibration = testing.write_calibration_jsonl(root / "calibration.jsonl", 24)
    pairs = testing.write_calibration_jsonl(root / "pairs.jsonl", 12, pairs=True)
    return World(root, base, aligned, finetuned, calibration, pairs)
