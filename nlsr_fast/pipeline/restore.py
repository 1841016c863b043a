"""Stage 3c: restoration t <- (1 - M)*t + M*e on the restored modules (SPEC §6)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import torch

from nlsr_fast.ops import PackedMask, masked_restore
from nlsr_fast.pipeline._types import Factors

__all__ = ["changed_entries", "restore"]

log = logging.getLogger(__name__)


def restore(
    ft_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ref_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    masks: Mapping[str, tuple[PackedMask, PackedMask]],
    restored: Collection[str] | Mapping[str, bool],
    *,
    backend: str | None = None,
) -> Factors:
    """New fine-tuned factors whose masked entries of the restored modules take the reference values.

    Args:
        ft_factors: {module: (A_t (r, d_in), B_t (d_out, r))}, in model order, any float dtype.
        ref_factors: {module: (A_e, B_e)}, same shapes; cast to t's dtype where copied.
        masks: {module: (mask_A, mask_B)}.
        restored: the names of the restored modules, or {module: flag}.
        backend: ops backend; None picks the fastest available.
    Returns:
        {module: (A, B)} in ft_factors' order and dtypes. Unrestored modules are the input tensors themselves
        (bit-identical); restored ones are new tensors (the inputs are not modified).
    """
    chosen = {k for k, v in restored.items() if v} if isinstance(restored, Mapping) else set(restored)
    unknown = sorted(chosen - set(ft_factors))
    if unknown:
        raise ValueError(f"restored modules {unknown[:5]} are not modules of the fine-tuned adapter")
    out: Factors = {}
    for name, (a_t, b_t) in ft_factors.items():
        if name not in chosen:
            out[name] = (a_t, b_t)
            continue
        if name not in ref_factors or name not in masks:
            raise ValueError(f"restored module {name!r} has no reference factors or masks")
        a_e, b_e = ref_factors[name]
        mask_a, mask_b = masks[name]
        device = a_t.device
        # The reference is cast to t's dtype once here (round to nearest), so every backend sees one dtype.
        new_a = masked_restore(a_t, a_e.to(device=device, dtype=a_t.dtype), mask_a.to(device), backend=backend)
        new_b = masked_restore(b_t, b_e.to(device=device, dtype=b_t.dtype), mask_b.to(device), backend=backend)
        out[name] = (new_a, new_b)
    log.info("restore: %d of %d modules restored", len(chosen), len(ft_factors))
    return out


def changed_entries(old: torch.Tensor, new: torch.Tensor) -> int:
    """Number of entries whose bits differ between two tensors of the same shape and dtype."""
    if old.shape != new.shape or old.dtype != new.dtype:
        raise ValueError(f"changed_entries needs equal shapes and dtypes, got {old.shape} {old.dtype}, "
                         f"{new.shape} {new.dtype}")
    if old.dtype.is_floating_point:
        int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[old.element_size()]
        return int(torch.count_nonzero(old.contiguous().view(int_dtype) != new.contiguous().view(int_dtype)))
    return int(torch.count_nonzero(old != new))
