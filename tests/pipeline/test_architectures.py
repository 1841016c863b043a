"""Beyond the Llama family: a whole realignment of a tiny Gemma 3 model (sliding window, QK-norm, GeGLU, scaled and
tied embeddings) in both modes. The calibration statistics come out of the streamed engine; here they are checked
again end to end through `antidote` (whose output is a plain function of wanda scores) against Hugging Face forward
hooks on the fine-tuned model, and NLSR (low_rank in LoRA mode, wanda in dense mode) runs and verifies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nlsr_fast
from nlsr_fast import testing
from nlsr_fast.verify import verify_summary

from .test_defences import check_antidote_dense, check_antidote_lora


@dataclass(frozen=True)
class GemmaWorld:
    base: Path  # Gemma 3 text model, 3 layers (two with a 4-token window), bf16, tied embeddings, several shards
    aligned: Path  # LoRA r = 4 on the seven projections
    finetuned: Path  # continues `aligned`
    dense_aligned: Path  # base + noise on the projections
    dense_finetuned: Path  # dense_aligned + noise on the projections, norms and the (tied) embeddings
    calibration: Path


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> GemmaWorld:
    root = tmp_path_factory.mktemp("gemma3")
    base = testing.make_tiny_llama(root / "base", layers=3, hidden=32, arch="gemma3_text", dtype=torch.bfloat16)
    aligned = testing.make_lora_adapter(root / "aligned", base, r=4, alpha=8.0, seed=1)
    finetuned = testing.continue_lora_adapter(root / "finetuned", aligned, seed=2, std=0.05,
                                              drift_modules=["layers.1.mlp", "q_proj"])
    dense_aligned = testing.derive_checkpoint(root / "dense_aligned", base, seed=1)
    dense_finetuned = testing.derive_checkpoint(root / "dense_finetuned", dense_aligned, seed=2,
                                                move=r"(_proj|norm|embed)")
    calibration = testing.write_calibration_jsonl(root / "calibration.jsonl", 16)
    return GemmaWorld(base, aligned, finetuned, dense_aligned, dense_finetuned, calibration)


def test_gemma3_config_is_the_real_families_shape(gemma: GemmaWorld) -> None:
    import json

    cfg = json.loads((gemma.base / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["tie_word_embeddings"] is True
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert "lm_head.weight" not in json.loads((gemma.base / "model.safetensors.index.json").read_text())["weight_map"]


def test_antidote_lora_on_gemma3_matches_hf_hooks(gemma: GemmaWorld, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rep = nlsr_fast.realign(gemma.base, gemma.aligned, gemma.finetuned, out, method="antidote", nsamples=16,
                            calibration=gemma.calibration, calib_dtype="float32", quiet=True)
    assert rep.counts["modules"] == 3 * 7
    check_antidote_lora(out, gemma.base, gemma.finetuned, gemma.calibration, 16, 0.1)
    problems, _ = verify_summary(out, aligned=gemma.aligned, finetuned=gemma.finetuned)
    assert problems == []


def test_antidote_dense_on_gemma3_matches_hf_hooks(gemma: GemmaWorld, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rep = nlsr_fast.realign(gemma.base, gemma.dense_aligned, gemma.dense_finetuned, out, method="antidote",
                            calibration=gemma.calibration, nsamples=8, calib_dtype="float32", quiet=True)
    assert rep.counts["modules"] == 3 * 7
    # the tied head stays tied (no lm_head.weight appears) and the pruned entries follow the HF hooks' scores
    check_antidote_dense(out, gemma.base, gemma.dense_finetuned, gemma.calibration, 8, [m.name for m in rep.modules])
    problems, _ = verify_summary(out, base=gemma.base, aligned=gemma.dense_aligned, finetuned=gemma.dense_finetuned)
    assert problems == []


@pytest.mark.parametrize(("mode", "method"), [("lora", "low_rank"), ("dense", "wanda")])
def test_nlsr_on_gemma3_runs_and_verifies(gemma: GemmaWorld, tmp_path: Path, mode: str, method: str) -> None:
    out = tmp_path / "out"
    aligned, finetuned = ((gemma.aligned, gemma.finetuned) if mode == "lora"
                          else (gemma.dense_aligned, gemma.dense_finetuned))
    rep = nlsr_fast.realign(gemma.base, aligned, finetuned, out, method=method, nsamples=8,
                            calibration=gemma.calibration, quiet=True)
    assert rep.mode == mode and rep.counts["modules"] == 3 * 7
    assert 0 < rep.counts["restored"] <= rep.counts["modules"]
    problems, checked = verify_summary(out, base=gemma.base, aligned=aligned, finetuned=finetuned)
    assert problems == [] and checked
