"""Backend registry: one table op -> {backend -> implementation}.

Explicit requests (argument or env NLSR_FAST_BACKEND) that cannot be met raise RuntimeError saying how to get
the backend; automatic choice falls back quietly (CUDA: triton, reference; CPU: cpu, reference).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Backend", "register", "available", "select", "cpp_available", "triton_available", "require_cpp"]


class Backend(str, enum.Enum):
    REFERENCE = "reference"  # plain torch, any device: the spec, the fallback and the bench baseline
    CPU = "cpu"  # the torch-free C++ core nlsr_fast._C, CPU tensors
    TRITON = "triton"  # CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, for tests)


_TABLE: dict[str, dict[Backend, Callable[..., Any]]] = {}


def register(op: str, backend: Backend) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TABLE.setdefault(op, {})[backend] = fn
        return fn

    return deco


@functools.cache
def _cpp_module() -> Any:
    try:
        from nlsr_fast import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def cpp_available() -> bool:
    return _cpp_module() is not None


def require_cpp() -> Any:
    mod = _cpp_module()
    if mod is None:
        raise RuntimeError(
            "backend 'cpu' needs the C++ extension nlsr_fast._C, which is not built in this install; "
            "reinstall without NLSR_FAST_NO_EXT=1 (pip install .), with cmake, ninja and a C++17 compiler available"
        )
    return mod


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    if not _triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _usable(backend: Backend, device: torch.device) -> bool:
    if backend is Backend.REFERENCE:
        return True
    if backend is Backend.CPU:
        return device.type == "cpu" and cpp_available()
    return triton_available(device)


def available(op: str, device: torch.device | str) -> list[Backend]:
    """Backends registered for `op` that can run on `device`, fastest first, reference last."""
    device = torch.device(device)
    order = [Backend.TRITON, Backend.CPU, Backend.REFERENCE] if device.type != "cpu" else [
        Backend.CPU,
        Backend.TRITON,
        Backend.REFERENCE,
    ]
    impls = _TABLE.get(op, {})
    return [b for b in order if b in impls and _usable(b, device)]


def _why_unusable(backend: Backend, device: torch.device) -> str:
    if backend is Backend.CPU:
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors only, got tensors on {device}"
        return "the C++ extension nlsr_fast._C is not built; reinstall without NLSR_FAST_NO_EXT=1 (pip install .)"
    if not _triton_installed():
        return "triton is not installed; pip install 'nlsr-fast[triton]'"
    return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got tensors on {device}"


def select(op: str, device: torch.device | str, backend: str | Backend | None = None) -> Callable[..., Any]:
    """The implementation of `op` for tensors on `device`."""
    device = torch.device(device)
    if backend is None:
        backend = os.environ.get("NLSR_FAST_BACKEND") or None
    impls = _TABLE.get(op)
    if impls is None:
        raise RuntimeError(f"unknown op {op!r}; registered ops: {sorted(_TABLE)}")
    if backend is None:
        return impls[available(op, device)[0]]
    try:
        wanted = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; choose one of {[b.value for b in Backend]}") from None
    if wanted not in impls:
        raise RuntimeError(f"op {op!r} has no {wanted.value!r} backend; it has {[b.value for b in impls]}")
    if not _usable(wanted, device):
        raise RuntimeError(f"op {op!r}: backend {wanted.value!r} is unavailable: {_why_unusable(wanted, device)}")
    return impls[wanted]
