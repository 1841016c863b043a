"""The non-finite check (io/finite.py): every float dtype, NaN / Inf / -Inf, the first index, the count, policies."""

from __future__ import annotations

import pytest
import torch

from nlsr_fast.io.finite import NonFinite, first_nonfinite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_first_nonfinite_finds_first_index_and_count(dtype: torch.dtype, bad: float) -> None:
    x = torch.randn(301, 37).to(dtype)
    assert first_nonfinite(x) is None
    x[200, 5] = bad
    x[17, 36] = bad
    x[300, 0] = bad
    index, value, count = first_nonfinite(x)  # type: ignore[misc]
    assert (index, count) == (17 * 37 + 36, 3)
    assert value != value if bad != bad else value == bad


def test_first_nonfinite_ignores_integers_and_empty_tensors() -> None:
    assert first_nonfinite(torch.arange(10)) is None
    assert first_nonfinite(torch.empty(0, 4)) is None


def test_large_tensor_crosses_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import nlsr_fast.io.finite as finite

    monkeypatch.setattr(finite, "_CHUNK", 1000)
    x = torch.zeros(10_000)
    x[[2500, 7001]] = float("nan")
    assert first_nonfinite(x)[::2] == (2500, 2)  # type: ignore[index]


def test_policy_refuses_or_records_once() -> None:
    x = torch.ones(3, 4)
    x[1, 2] = float("inf")
    message = r"f\.safetensors: tensor 'w' holds 1 non-finite value\(s\); the first is inf at index \[1, 2\]"
    with pytest.raises(ValueError, match=message):
        NonFinite().check(x, file="f.safetensors", tensor="w")
    allow = NonFinite(allow=True)
    allow.check(x, file="f.safetensors", tensor="w")
    allow.check(x, file="f.safetensors", tensor="w")  # read again in pass 2: reported once
    assert allow.found == [{"file": "f.safetensors", "tensor": "w", "count": 1, "first_index": [1, 2],
                            "first_value": "inf"}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_fast_check_agrees_with_torch_isfinite(dtype: torch.dtype, layout: str) -> None:
    """The C++ exponent-bit check (contiguous CPU tensors) and the torch fallback (the transposed view) give the same
    answer as torch.isfinite on every special value, including the largest finite ones and subnormals."""
    from nlsr_fast.io.finite import first_nonfinite

    info = torch.finfo(dtype)
    specials = [info.max, -info.max, info.tiny, info.tiny / 4, -0.0, float("nan"), float("inf"), float("-inf")]
    for value in specials:
        t = torch.randn(37, 53).to(dtype)
        t[11, 7] = value
        t[30, 2] = value
        t = t if layout == "contiguous" else t.t()
        bad = ~torch.isfinite(t.reshape(-1))
        got = first_nonfinite(t)
        if not bool(bad.any()):
            assert got is None, value
        else:
            assert got is not None and got[0] == int(bad.nonzero()[0, 0]) and got[2] == int(bad.sum()), value
