"""The statistics-only forward of sequential calibration (each layer's MLP on the response rows only, down_proj's
output skipped) reads the same numbers as a full forward: with a transform that changes no factor, sequential and
plain calibration see the same inputs in every layer, so their statistics must agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.calib import collect_lora_statistics


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("micro_batch", [None, 3])
def test_statistics_only_forward_is_bit_exact(tiny_factory, arch: str, micro_batch: int | None) -> None:
    tiny = tiny_factory(arch)
    calls: list[int] = []

    def keep(layer: int, stats: dict) -> dict:
        calls.append(layer)
        return {}  # no new factors: the recomputed outputs equal the plain forward's

    seq = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, sequential=True, transform=keep,
                                  micro_batch=micro_batch)
    plain = collect_lora_statistics(tiny.reader(), tiny.factors, tiny.calib, micro_batch=micro_batch)
    assert calls == list(range(tiny.layers))
    assert list(seq) == list(plain) == list(tiny.factors)
    n_resp = sum(s.n_response for s in tiny.calib.sequences())
    for name in tiny.factors:
        a, b = seq[name], plain[name]
        for field in ("gram", "x_sq", "z_sq"):
            ta, tb = getattr(a, field), getattr(b, field)
            assert ta.dtype == tb.dtype == torch.float64 and ta.shape == tb.shape
            diff = (ta != tb).sum().item()
            assert diff == 0, f"{name}.{field}: {diff} entries differ, max |d| {(ta - tb).abs().max().item():.3e}"
        assert (a.n_tokens, a.n_samples) == (b.n_tokens, b.n_samples) == (n_resp, len(tiny.calib)), name
