"""tests/ops fixtures: seeds, NaN-poisoned allocations, device cache cleanup (CONTRIBUTING.md rule T4)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

_UINT8_POISON = 0xA5


def _poison(t: Any) -> Any:
    """Fill a fresh allocation with garbage a kernel must overwrite: NaN for floats, 0xA5 for uint8."""
    if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
        with torch.no_grad():
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype == torch.uint8:
                t.fill_(_UINT8_POISON)
    return t


def _poisoning(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _poison(fn(*args, **kwargs))

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty / empty_like / Tensor.new_empty return poisoned memory, so an unwritten output shows up."""
    monkeypatch.setattr(torch, "empty", _poisoning(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoning(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoning(torch.Tensor.new_empty))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _free_device_cache() -> Iterator[None]:
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose backends explicitly; a stray NLSR_FAST_BACKEND in the shell must not redirect them."""
    monkeypatch.delenv("NLSR_FAST_BACKEND", raising=False)
