"""Backend registry: available(), automatic and explicit selection, NLSR_FAST_BACKEND, missing backends."""

from __future__ import annotations

import warnings

import pytest
import torch

import nlsr_fast.ops as ops
from nlsr_fast.ops import HOST_OPS, OPS, Backend, PackedMask, available, select
from nlsr_fast.ops import _registry as registry

CPU = torch.device("cpu")
REFERENCES = {op: getattr(ops, f"{op}_reference") for op in OPS}


def _call(op: str, backend: str | None):
    """A small valid call of each public op."""
    x = torch.randn(3, 8)
    y = torch.randn(3, 8)
    if op == "row_topk_mask":
        return ops.row_topk_mask(x, 0.5, backend=backend)
    if op == "matrix_topk_mask":
        return ops.matrix_topk_mask(x, 0.5, backend=backend)
    if op == "masked_delta_cosine":
        return ops.masked_delta_cosine(x, y, PackedMask.ones((3, 8)), backend=backend)
    if op == "lora_masked_cosine":
        a, b = torch.randn(2, 8), torch.randn(3, 2)
        return ops.lora_masked_cosine(a, b, a, b, PackedMask.ones((2, 8)), PackedMask.ones((3, 2)), backend=backend)
    if op == "masked_restore":
        return ops.masked_restore(x, y, PackedMask.ones((3, 8)), backend=backend)
    if op == "extrapolate":
        return ops.extrapolate(x, y, 0.9, backend=backend)
    if op == "masked_gather":
        return ops.masked_gather(x, PackedMask.ones((3, 8)), backend=backend)
    if op == "masked_scatter":
        return ops.masked_scatter(x, PackedMask.ones((3, 8)), y.reshape(-1), backend=backend)
    if op == "random_row_mask":
        return ops.random_row_mask((3, 8), 0.5, 7, backend=backend)
    raise AssertionError(op)


@pytest.fixture
def no_cpp_no_triton(monkeypatch):
    """As on a machine without the C++ extension and without triton."""
    monkeypatch.setattr(registry, "_cpp_module", lambda: None)
    monkeypatch.setattr(registry, "_triton_installed", lambda: False)


@pytest.mark.parametrize("op", OPS)
def test_available_lists_reference_last(op):
    got = available(op, CPU)
    assert got and got[-1] is Backend.REFERENCE
    assert all(isinstance(b, Backend) for b in got)
    assert len(set(got)) == len(got)


@pytest.mark.parametrize("op", OPS)
def test_available_order_on_cpu_is_cpu_triton_reference(op):
    order = [Backend.CPU, Backend.TRITON, Backend.REFERENCE]
    got = available(op, CPU)
    assert got == sorted(got, key=order.index)


@pytest.mark.parametrize("op", OPS)
def test_available_accepts_strings(op):
    assert available(op, "cpu") == available(op, CPU)


def test_available_unknown_op_is_empty():
    assert available("no_such_op", CPU) == []


@pytest.mark.parametrize("op", OPS)
def test_cpu_backend_needs_the_extension(op, monkeypatch):
    monkeypatch.setattr(registry, "_cpp_module", lambda: None)
    assert Backend.CPU not in available(op, CPU)
    assert not registry.cpp_available()


@pytest.mark.parametrize("op", OPS)
def test_cpu_backend_never_for_other_devices(op):
    assert Backend.CPU not in available(op, torch.device("meta"))
    assert Backend.CPU not in available(op, torch.device("cuda"))


@pytest.mark.parametrize("op", OPS)
def test_triton_on_cpu_only_when_interpreting(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert Backend.TRITON not in available(op, CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    registered = Backend.TRITON in registry._TABLE[op]
    assert (Backend.TRITON in available(op, CPU)) == (registered and registry._triton_installed())


@pytest.mark.parametrize("op", OPS)
def test_without_cpp_and_triton_only_reference_remains(op, no_cpp_no_triton, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available(op, CPU) == [Backend.REFERENCE]
    assert available(op, torch.device("cuda")) == [Backend.REFERENCE]


@pytest.mark.parametrize("op", OPS)
def test_automatic_selection_picks_the_first_available(op):
    assert select(op, CPU) is registry._TABLE[op][available(op, CPU)[0]]


@pytest.mark.parametrize("op", OPS)
def test_automatic_selection_falls_back_quietly(op, no_cpp_no_triton):
    assert select(op, CPU) is REFERENCES[op]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(op, None)


@pytest.mark.parametrize("op", OPS)
def test_explicit_reference(op):
    assert select(op, CPU, "reference") is REFERENCES[op]
    assert select(op, CPU, Backend.REFERENCE) is REFERENCES[op]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_explicit_unavailable_backend_raises(op, name, no_cpp_no_triton):
    with pytest.raises(RuntimeError, match=f"{op}.*'{name}'"):
        select(op, CPU, name)
    with pytest.raises(RuntimeError, match=f"'{name}'"):
        _call(op, name)


@pytest.mark.parametrize("op", OPS)
def test_explicit_unavailable_message_says_how_to_get_it(op, no_cpp_no_triton):
    if Backend.CPU in registry._TABLE[op]:
        with pytest.raises(RuntimeError, match="nlsr_fast._C"):
            select(op, CPU, "cpu")
    if Backend.TRITON in registry._TABLE[op]:
        with pytest.raises(RuntimeError, match="pip install"):
            select(op, CPU, "triton")


@pytest.mark.parametrize("op", OPS)
def test_explicit_cpu_backend_on_another_device_raises(op):
    with pytest.raises(RuntimeError, match="'cpu'"):
        select(op, torch.device("meta"), "cpu")


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_name_is_a_value_error(op):
    with pytest.raises(ValueError, match="'cuda_fast'.*reference"):
        select(op, CPU, "cuda_fast")
    with pytest.raises(ValueError, match="'cuda_fast'"):
        _call(op, "cuda_fast")


def test_unknown_op_raises():
    with pytest.raises(RuntimeError, match="'no_such_op'.*row_topk_mask"):
        select("no_such_op", CPU)


@pytest.mark.parametrize("op", OPS)
def test_env_selects_backend(op, monkeypatch):
    monkeypatch.setenv("NLSR_FAST_BACKEND", "reference")
    assert select(op, CPU) is REFERENCES[op]
    _call(op, None)


@pytest.mark.parametrize("op", OPS)
def test_env_request_is_explicit(op, monkeypatch, no_cpp_no_triton):
    """A backend named in NLSR_FAST_BACKEND that cannot run fails loudly, like the argument."""
    monkeypatch.setenv("NLSR_FAST_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="'cpu'"):
        select(op, CPU)
    monkeypatch.setenv("NLSR_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        _call(op, None)


@pytest.mark.parametrize("op", OPS)
def test_argument_overrides_env(op, monkeypatch):
    monkeypatch.setenv("NLSR_FAST_BACKEND", "bogus")
    assert select(op, CPU, "reference") is REFERENCES[op]


def test_empty_env_means_automatic(monkeypatch):
    monkeypatch.setenv("NLSR_FAST_BACKEND", "")
    assert select("extrapolate", CPU) is registry._TABLE["extrapolate"][available("extrapolate", CPU)[0]]


def test_backend_names():
    assert [b.value for b in Backend] == ["reference", "cpu", "triton"]
    assert Backend("cpu") is Backend.CPU


def test_every_op_registers_a_reference():
    assert set(OPS) <= set(registry._TABLE)
    for op in OPS:
        assert registry._TABLE[op][Backend.REFERENCE] is REFERENCES[op]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_triton_backend_unless_declared_host_only(op):
    """Three backends per op; an op without a Triton kernel is declared in HOST_OPS with its reason."""
    impls = registry._TABLE[op]
    assert Backend.REFERENCE in impls and Backend.CPU in impls
    assert (Backend.TRITON in impls) == (op not in HOST_OPS), f"{op}: triton registered = {Backend.TRITON in impls}"


def test_host_ops_are_ops_with_a_reason():
    assert set(HOST_OPS) <= set(OPS)
    assert all(isinstance(why, str) and len(why) > 20 for why in HOST_OPS.values())

