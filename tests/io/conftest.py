"""Session-scoped tiny checkpoints and PEFT adapters for the io tests (made on disk, nothing from a hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nlsr_fast.testing import continue_lora_adapter, make_lora_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def io_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io")


@pytest.fixture(scope="session")
def tiny_base(io_root: Path) -> Path:
    return make_tiny_llama(io_root / "base", layers=2, with_tokenizer=False)


@pytest.fixture(scope="session")
def other_base(io_root: Path) -> Path:
    """A base of another size (hidden 48), for adapter/base mismatch tests."""
    return make_tiny_llama(io_root / "other_base", layers=2, hidden=48, intermediate=96, with_tokenizer=False)


@pytest.fixture(scope="session")
def adapter_plain(io_root: Path, tiny_base: Path) -> Path:
    return make_lora_adapter(io_root / "ad_plain", tiny_base, r=4, alpha=8.0)


@pytest.fixture(scope="session")
def adapter_rslora(io_root: Path, tiny_base: Path) -> Path:
    return make_lora_adapter(io_root / "ad_rslora", tiny_base, r=4, alpha=6.0, use_rslora=True, seed=3)


@pytest.fixture(scope="session")
def adapter_patterns(io_root: Path, tiny_base: Path) -> Path:
    return make_lora_adapter(
        io_root / "ad_patterns",
        tiny_base,
        r=4,
        alpha=8.0,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
        alpha_pattern={"v_proj": 3.0, r"layers\.0\.self_attn\.o_proj": 5.0},
        seed=4,
    )


@pytest.fixture(scope="session")
def adapter_continued(io_root: Path, adapter_plain: Path) -> Path:
    return continue_lora_adapter(io_root / "ad_continued", adapter_plain)


@pytest.fixture(scope="session")
def adapter_other_base(io_root: Path, other_base: Path) -> Path:
    return make_lora_adapter(io_root / "ad_other", other_base, r=4, alpha=8.0)


@pytest.fixture(scope="session")
def tiny_gpt2(io_root: Path) -> Path:
    """A tiny GPT-2 (Conv1D linears, weights stored (d_in, d_out)): PEFT sets fan_in_fan_out for it."""
    import transformers

    folder = io_root / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(os.fspath(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def adapter_gpt2(io_root: Path, tiny_gpt2: Path) -> Path:
    """A PEFT-written LoRA adapter on the tiny GPT-2 (c_attn 16 -> 48, c_fc 16 -> 64), fan_in_fan_out true."""
    return make_lora_adapter(io_root / "ad_gpt2", tiny_gpt2, r=4, alpha=8.0, targets=("c_attn", "c_fc"), seed=5)
