"""The streamed engine against the full HF model + PEFT adapter (docs/algorithm.md §9.7) and the released schedule."""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.calib import collect_lora_statistics, lora_gradient_scores, project_factors
from nlsr_fast.calib.data import CalibrationSet
from nlsr_fast.calib.hf_reference import hf_peft_model, hook_statistics, per_sample_grad_scores, released_schedule


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp_min(1e-30)
    err = (a - b).abs().max() / scale
    assert err <= rtol, f"{what}: max rel err {err:.3g}"


def _check_stats(got, want, rtol=1e-5):
    assert list(got) == list(want) or set(got) == set(want)
    for n in want:
        g, w = got[n], want[n]
        assert g.n_tokens == w.n_tokens and g.n_samples == w.n_samples, n
        _close(g.gram, w.gram, rtol, f"{n} gram")
        _close(g.x_sq, w.x_sq, rtol, f"{n} x_sq")
        _close(g.z_sq, w.z_sq, rtol, f"{n} z_sq")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_statistics_match_hf_peft_hooks(tiny_factory, arch):
    t = tiny_factory(arch)
    peft = hf_peft_model(t.base, t.adapter, t.factors)
    want = hook_statistics(peft, t.calib)
    got = collect_lora_statistics(t.reader(), t.factors, t.calib, micro_batch=4)
    assert list(got) == list(t.factors)
    _check_stats(got, want)
    n_resp = sum(s.n_response for s in t.calib.samples)
    assert got[next(iter(got))].n_tokens == n_resp
    assert got[next(iter(got))].n_samples == len(t.calib)


def test_micro_batch_invariance_and_default(tiny):
    a = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, micro_batch=1)
    b = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, micro_batch=5)
    c = collect_lora_statistics(tiny.base, tiny.factors, tiny.calib)  # a folder, default micro-batching
    _check_stats(b, a, 1e-6)
    _check_stats(c, a, 1e-6)


def test_progress_and_subset_of_modules(tiny):
    names = [n for n in tiny.factors if ".1." in n or n.endswith("q_proj")]
    sub = {n: tiny.factors[n] for n in names}
    calls = []
    got = collect_lora_statistics(tiny.reader(), sub, tiny.calib, progress=lambda i, n: calls.append((i, n)))
    assert list(got) == names
    assert calls == [(i + 1, tiny.layers) for i in range(tiny.layers)]
    # modules of a layer without adapter still see the same inputs: stats agree with the full adapter run
    peft = hf_peft_model(tiny.base, tiny.adapter, tiny.factors)
    want = hook_statistics(peft, tiny.calib, names=[n for n in names if ".0." in n])
    _check_stats({n: got[n] for n in want}, want)


def _lowrank_transform(factors, sparsity):
    def transform(layer, stats):
        return {n: project_factors(factors[n][0], factors[n][1], st.gram, sparsity) for n, st in stats.items()}

    return transform


def test_sequential_matches_released_schedule(tiny):
    s = 0.5
    got_proj = {}

    def transform(layer, stats):
        out = _lowrank_transform(tiny.factors, s)(layer, stats)
        got_proj.update(out)
        return out

    got = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, sequential=True, transform=transform,
                                  micro_batch=3)
    peft = hf_peft_model(tiny.base, tiny.adapter, tiny.factors)
    want, want_proj = released_schedule(peft, tiny.calib, s, tiny.layers)
    _check_stats(got, want, 1e-4)
    for n in want_proj:
        _close(got_proj[n][0], want_proj[n][0], 1e-4, f"{n} A~")
        _close(got_proj[n][1], want_proj[n][1], 1e-4, f"{n} B~")
    # and the projection changes later layers: non-sequential stats of the last layer differ
    plain = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib)
    last = [n for n in tiny.factors if f".{tiny.layers - 1}." in n][0]
    assert not torch.allclose(plain[last].gram, got[last].gram, rtol=1e-3)
    first = [n for n in tiny.factors if ".0." in n][0]
    _close(plain[first].gram, got[first].gram, 1e-6, "layer 0 unaffected")


def test_sequential_needs_transform_and_validates(tiny):
    with pytest.raises(ValueError, match="transform"):
        collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, sequential=True)

    def bad(layer, stats):
        return {"model.layers.9.mlp.up_proj": (torch.zeros(1), torch.zeros(1))}

    with pytest.raises(ValueError, match="not a module of that layer"):
        collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, sequential=True, transform=bad)


def test_errors(tiny, tmp_path):
    import json
    import shutil

    with pytest.raises(ValueError, match="not in a decoder layer"):
        collect_lora_statistics(tiny.reader(), {"lm_head": tiny.factors[next(iter(tiny.factors))]}, tiny.calib)
    name = next(iter(tiny.factors))
    A, B, sc = tiny.factors[name]
    with pytest.raises(ValueError, match="do not fit"):
        collect_lora_statistics(tiny.reader(), {name: (A[:, :-1], B, sc)}, tiny.calib)
    other = tmp_path / "gpt2"
    shutil.copytree(tiny.base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gpt2'.*llama"):
        collect_lora_statistics(other, tiny.factors, tiny.calib)
    with pytest.raises(ValueError, match="empty"):
        collect_lora_statistics(tiny.reader(), tiny.factors, CalibrationSet([], {}))
    with pytest.raises(ValueError, match="micro_batch"):
        collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, micro_batch=0)


def test_bf16_forward_close_to_fp32(tiny):
    a = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib)
    b = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, dtype=torch.bfloat16)
    for n in a:
        assert b[n].gram.dtype == torch.float64
        _close(b[n].gram, a[n].gram, 0.1, n)


@pytest.mark.parametrize("running", [False, True])
def test_snip_scores_match_autograd(tiny, running):
    peft = hf_peft_model(tiny.base, tiny.adapter, tiny.factors)
    want = per_sample_grad_scores(peft, tiny.calib, "nll", running=running)
    got = lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, loss="nll", micro_batch=3,
                               accumulate="running" if running else "per_sample")
    assert list(got) == list(tiny.factors)
    for n in want:
        assert got[n][0].dtype == torch.float32 and got[n][0].shape == want[n][0].shape
        _close(got[n][0], want[n][0], 1e-4, f"{n} A")
        _close(got[n][1], want[n][1], 1e-4, f"{n} B")


def test_snip_per_sample_differs_from_running(tiny):
    a = lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib)
    b = lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, accumulate="running")
    n = next(iter(a))
    assert not torch.allclose(a[n][0], b[n][0])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_dpo_scores_match_autograd(tiny_factory, arch):
    t = tiny_factory(arch)
    peft = hf_peft_model(t.base, t.adapter, t.factors)
    want = per_sample_grad_scores(peft, t.pairs, "dpo", beta=0.1)
    got = lora_gradient_scores(t.reader(), t.factors, t.pairs, loss="dpo", beta=0.1)
    for n in want:
        _close(got[n][0], want[n][0], 1e-4, f"{n} A")
        _close(got[n][1], want[n][1], 1e-4, f"{n} B")


def test_gradient_errors(tiny):
    with pytest.raises(ValueError, match="pairs"):
        lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, loss="dpo")
    with pytest.raises(ValueError, match="loss"):
        lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, loss="mse")
    with pytest.raises(ValueError, match="accumulate"):
        lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, accumulate="sum")


def test_sliding_window_matches_hf(tiny_factory, tmp_path):
    """A Mistral config whose window (6) is shorter than the sequences: the engine's mask must match HF's."""
    import json
    import shutil

    t = tiny_factory("mistral")
    base = tmp_path / "mistral_sw"
    shutil.copytree(t.base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["sliding_window"] = 6
    (base / "config.json").write_text(json.dumps(cfg))
    assert max(s.n_tokens for s in t.calib.samples) > 6
    peft = hf_peft_model(base, t.adapter, t.factors)
    want = hook_statistics(peft, t.calib)
    got = collect_lora_statistics(base, t.factors, t.calib, micro_batch=4)
    _check_stats(got, want)
    full = collect_lora_statistics(t.reader(), t.factors, t.calib, micro_batch=4)
    n = [k for k in full if ".1." in k][0]
    assert not torch.allclose(full[n].gram, got[n].gram, rtol=1e-4)


@pytest.mark.parametrize("accumulate", ["per_sample", "running"])
def test_gradient_scores_chunked_equal_unchunked(tiny, accumulate: str) -> None:
    """A tiny activation budget splits the samples into chunks; the sums (and the carried running sum) are unchanged."""
    from nlsr_fast.calib.gradients import _activation_chunks
    from nlsr_fast.calib.runtime import _Model

    chunks = _activation_chunks(tiny.calib, _Model(tiny.reader(), None, torch.device("cpu")), 1)
    assert len(chunks) == len(tiny.calib.samples) > 1  # one sample per chunk: the carry path is exercised
    whole = lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, accumulate=accumulate)
    chunked = lora_gradient_scores(tiny.reader(), tiny.factors, tiny.calib, accumulate=accumulate,
                                   max_activation_bytes=1)
    assert set(whole) == set(chunked)
    for name, (ga, gb) in whole.items():
        torch.testing.assert_close(chunked[name][0], ga, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked[name][1], gb, rtol=1e-5, atol=1e-6)


def test_gradient_scores_dpo_chunked_equal_unchunked(tiny_factory) -> None:
    t = tiny_factory("llama")
    whole = lora_gradient_scores(t.reader(), t.factors, t.pairs, loss="dpo")
    chunked = lora_gradient_scores(t.reader(), t.factors, t.pairs, loss="dpo", max_activation_bytes=1)
    for name, (ga, gb) in whole.items():
        torch.testing.assert_close(chunked[name][0], ga, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked[name][1], gb, rtol=1e-5, atol=1e-6)


def _gemma_copy(t, tmp_path, name: str, **config) -> object:
    """A copy of the tiny Gemma 3 checkpoint with `config` entries changed."""
    import json
    import shutil

    base = tmp_path / name
    shutil.copytree(t.base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config)
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_gemma3_traits_match_hf(tiny_factory, tmp_path):
    """Gemma 3's sliding window (4 tokens on two of three layers), per-layer-type rotary bases, scaled and tied
    embeddings and soft-capped logits: snip scores (forward, head and backward) match autograd on the HF model, and
    each trait changes the numbers (so a match is not by luck)."""
    t = tiny_factory("gemma3_text")
    assert max(s.n_tokens for s in t.calib.samples) > 4
    capped = _gemma_copy(t, tmp_path, "capped", final_logit_softcapping=0.5)
    peft = hf_peft_model(capped, t.adapter, t.factors)
    want = per_sample_grad_scores(peft, t.calib, "nll")
    got = lora_gradient_scores(capped, t.factors, t.calib, loss="nll", micro_batch=3)
    for n in want:
        _close(got[n][0], want[n][0], 1e-4, f"{n} A")
        _close(got[n][1], want[n][1], 1e-4, f"{n} B")
    uncapped = lora_gradient_scores(t.reader(), t.factors, t.calib, loss="nll", micro_batch=3)
    n = next(iter(want))
    assert not torch.allclose(uncapped[n][0], got[n][0], rtol=1e-3)
    # the window is in effect: a window longer than every sequence changes the statistics after layer 0
    wide = _gemma_copy(t, tmp_path, "wide", sliding_window=512)
    a = collect_lora_statistics(t.reader(), t.factors, t.calib, micro_batch=4)
    b = collect_lora_statistics(wide, t.factors, t.calib, micro_batch=4)
    n = [k for k in a if ".1." in k][0]
    assert not torch.allclose(a[n].gram, b[n].gram, rtol=1e-4)
    # and so are the two rotary bases: one base for both layer types changes them too
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    one_base = _gemma_copy(t, tmp_path, "one_base", rope_parameters={"full_attention": rope,
                                                                      "sliding_attention": rope})
    c = collect_lora_statistics(one_base, t.factors, t.calib, micro_batch=4)
    n = [k for k in a if ".2.mlp" in k][0]  # the first full-attention layer's output feeds layer 2's MLP
    assert not torch.allclose(a[n].gram, c[n].gram, rtol=1e-4)


def test_gemma2_style_attention_softcap_is_refused(tiny_factory, tmp_path):
    t = tiny_factory("gemma3_text")
    base = _gemma_copy(t, tmp_path, "attn_cap", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        collect_lora_statistics(base, t.factors, t.calib)
