"""Dense calibration (docs/algorithm.md §3 "Dense mode"): the streamed dense statistics and snip scores against a
plain full-model
Hugging Face forward / autograd on the same weights.

Tolerances (fp32 forward on both sides, the reference summed in float64; errors relative to the largest reference
entry, measured ~2e-8 for x_sq and ~2e-7 for the scores on this machine):
* x_sq: max |got − want| / max |want| ≤ 1e-6; n_tokens and n_samples exact;
* snip Σ_n |∂L_n/∂W| (per_sample and running): ≤ 1e-5;
* chunked (activation budget of 1 byte) against unchunked: torch.testing.assert_close(rtol=1e-5, atol=1e-6).
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from nlsr_fast.calib import collect_dense_statistics, dense_gradient_scores
from nlsr_fast.calib.hf_reference import dense_hook_statistics, dense_per_sample_grad_scores, hf_dense_model
from nlsr_fast.testing import LORA_TARGETS


class DictReader:
    """The reader protocol of calib.runtime over an in-memory dict: a 'virtual' reference model."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._t = tensors
        self.reads: list[str] = []

    def keys(self) -> list[str]:
        return list(self._t)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def get(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        return self._t[key]

    def get_many(self, keys) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in keys}


def _targets(layers: int, names=LORA_TARGETS) -> list[str]:
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return [f"model.layers.{i}.{'self_attn' if n in attn else 'mlp'}.{n}" for i in range(layers) for n in names]


def _reference(t, seed: int = 7) -> tuple[DictReader, dict[str, torch.Tensor]]:
    """A dense 'reference': the tiny base with every target weight perturbed (W_e = W_0 + noise), served by a
    DictReader; also the replaced tensors, for the HF model."""
    reader = t.reader()
    tensors = reader.get_many(reader.keys())
    gen = torch.Generator().manual_seed(seed)
    changed = {}
    for name in _targets(t.layers):
        w = tensors[f"{name}.weight"]
        changed[f"{name}.weight"] = w + 0.05 * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    tensors.update(changed)
    return DictReader(dict(reader.config), tensors), changed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_dense_statistics_match_hf_hooks(tiny_factory, arch):
    t = tiny_factory(arch)
    reader, changed = _reference(t)
    targets = _targets(t.layers)
    want = dense_hook_statistics(hf_dense_model(t.base, changed), t.calib, targets)
    got = collect_dense_statistics(reader, targets, t.calib, micro_batch=4)
    assert list(got) == targets
    n_resp = sum(s.n_response for s in t.calib.samples)
    for n in targets:
        assert got[n].x_sq.dtype == torch.float64 and got[n].x_sq.shape == want[n].x_sq.shape
        assert got[n].n_tokens == want[n].n_tokens == n_resp
        assert got[n].n_samples == want[n].n_samples == len(t.calib)
        assert _rel(got[n].x_sq, want[n].x_sq) <= 1e-6, n
    # the reader's weights are the ones used: the base model's own statistics differ after layer 0's inputs
    plain = collect_dense_statistics(t.reader(), targets, t.calib, micro_batch=4)
    last = targets[-1]
    assert _rel(plain[last].x_sq, got[last].x_sq) > 1e-3


def test_dense_statistics_subset_folder_and_micro_batches(tiny):
    targets = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj"]  # any order, any subset
    calls = []
    a = collect_dense_statistics(tiny.base, targets, tiny.calib, progress=lambda i, n: calls.append((i, n)))
    b = collect_dense_statistics(tiny.reader(), targets, tiny.calib, micro_batch=1)
    assert list(a) == targets
    assert calls == [(i + 1, tiny.layers) for i in range(tiny.layers)]
    for n in targets:
        assert _rel(a[n].x_sq, b[n].x_sq) <= 1e-6
    want = dense_hook_statistics(hf_dense_model(tiny.base), tiny.calib, targets)
    for n in targets:
        assert _rel(a[n].x_sq, want[n].x_sq) <= 1e-6


@pytest.mark.parametrize("running", [False, True])
def test_dense_snip_matches_autograd(tiny, running):
    reader, changed = _reference(tiny)
    targets = _targets(tiny.layers)
    want = dense_per_sample_grad_scores(hf_dense_model(tiny.base, changed), tiny.calib, targets, running=running)
    seen: list[int] = []
    errs: dict[str, float] = {}

    def on_layer(idx: int, scores: dict[str, torch.Tensor]) -> None:
        seen.append(idx)
        assert list(scores) == [n for n in targets if n.startswith(f"model.layers.{idx}.")]
        for n, s in scores.items():
            assert s.dtype == torch.float32 and s.shape == want[n].shape
            errs[n] = _rel(s, want[n])

    dense_gradient_scores(reader, targets, tiny.calib, on_layer=on_layer, micro_batch=3,
                          accumulate="running" if running else "per_sample")
    assert seen == list(reversed(range(tiny.layers)))
    assert set(errs) == set(targets)
    assert max(errs.values()) <= 1e-5, errs


def test_dense_on_layer_holds_one_layer_at_a_time(tiny):
    """on_layer is called once per layer in backward order, and by the time the next layer arrives the engine keeps
    no reference to the previous layer's score tensors (the caller here keeps only weak references)."""
    targets = _targets(tiny.layers)
    seen: list[int] = []
    previous: list[weakref.ref] = []

    def on_layer(idx: int, scores: dict[str, torch.Tensor]) -> None:
        gc.collect()
        assert all(r() is None for r in previous), f"layer {idx}: scores of layer {seen[-1]} are still alive"
        previous.clear()
        previous.extend(weakref.ref(s) for s in scores.values())
        seen.append(idx)

    for accumulate in ("per_sample", "running"):
        seen.clear()
        previous.clear()
        dense_gradient_scores(tiny.reader(), targets, tiny.calib, on_layer=on_layer, accumulate=accumulate)
        assert seen == list(reversed(range(tiny.layers)))
        gc.collect()
        assert all(r() is None for r in previous)


@pytest.mark.parametrize("accumulate", ["per_sample", "running"])
def test_dense_snip_chunked_equal_unchunked(tiny, accumulate, tmp_path):
    targets = _targets(tiny.layers, names=("q_proj", "down_proj"))
    whole: dict[str, torch.Tensor] = {}
    chunked: dict[str, torch.Tensor] = {}
    order: list[int] = []
    dense_gradient_scores(tiny.reader(), targets, tiny.calib, accumulate=accumulate,
                          on_layer=lambda i, s: whole.update(s))
    dense_gradient_scores(tiny.reader(), targets, tiny.calib, accumulate=accumulate, max_activation_bytes=1,
                          spill_dir=tmp_path, on_layer=lambda i, s: (order.append(i), chunked.update(s)))
    assert order == list(reversed(range(tiny.layers)))  # once per layer even with one chunk per sample
    assert list(tmp_path.iterdir()) == []  # the spill folder is cleaned up
    assert set(whole) == set(chunked) == set(targets)
    for n in targets:
        torch.testing.assert_close(chunked[n], whole[n], rtol=1e-5, atol=1e-6)


def test_dense_errors(tiny, tmp_path):
    t = _targets(tiny.layers)
    noop = lambda i, s: None  # noqa: E731
    with pytest.raises(ValueError, match="snip"):
        dense_gradient_scores(tiny.reader(), t, tiny.pairs, loss="dpo", on_layer=noop)
    with pytest.raises(ValueError, match="accumulate"):
        dense_gradient_scores(tiny.reader(), t, tiny.calib, accumulate="sum", on_layer=noop)
    with pytest.raises(ValueError, match="samples"):
        dense_gradient_scores(tiny.reader(), t, tiny.pairs, on_layer=noop)
    for bad, msg in [
        ([], "no target"),
        (["model.layers.0.mlp.up_proj.weight"], "without '.weight'"),
        (["lm_head"], "not in a decoder layer"),
        (["model.layers.0.mlp.nope"], "has no weight"),
        (["model.layers.0.input_layernorm"], "not a linear"),
        (["model.layers.0.mlp.up_proj"] * 2, "twice"),
    ]:
        with pytest.raises(ValueError, match=msg):
            collect_dense_statistics(tiny.reader(), bad, tiny.calib)
    with pytest.raises(ValueError, match="not a linear"):
        dense_gradient_scores(tiny.reader(), ["model.layers.0.input_layernorm"], tiny.calib, on_layer=noop)
    other = tmp_path / "gpt2"
    other.mkdir()
    cfg = dict(tiny.reader().config)
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gpt2'"):
        collect_dense_statistics(DictReader(cfg, {}), t, tiny.calib)
