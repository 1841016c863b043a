"""Input checks shared by the public ops (adapters and kernels assume these hold)."""

from __future__ import annotations

import torch

from nlsr_fast.ops.packed_mask import PackedMask

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_matrix(name: str, t: torch.Tensor, *, ndims: tuple[int, ...] = (2,)) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = False) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def check_mask(name: str, mask: PackedMask, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(mask, PackedMask):
        raise TypeError(f"{name} must be a PackedMask (PackedMask.from_bool(t)), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the tensors on {device}")


def check_keep(keep: float) -> None:
    if not isinstance(keep, (int, float)) or not 0.0 <= float(keep) <= 1.0:
        raise ValueError(f"keep must be a number in [0, 1], got {keep!r}")
