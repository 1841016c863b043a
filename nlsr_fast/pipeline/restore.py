"""Stage 3c: restoration t <- (1 - M)*t + M*e on the restored modules (docs/algorithm.md §6)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import torch

from nlsr_fast.ops import PackedMask, masked_gather, masked_restore, masked_scatter
from nlsr_fast.ops.masked_values import changed_bits
from nlsr_fast.pipeline._types import Factors

__all__ = ["changed_entries", "masked_values", "put_masked_values", "restore"]

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
        return changed_bits(old, new)
    return int(torch.count_nonzero(old != new))


def masked_values(source: torch.Tensor, mask: PackedMask, *, backend: str | None = None) -> torch.Tensor:
    """The entries of `source` under `mask`, row-major, as a 1-D tensor (what restoration puts there, when `source`
    is the reference already cast to the fine-tuned dtype)."""
    return masked_gather(source, mask.to(source.device), backend=backend)


def put_masked_values(target: torch.Tensor, mask: PackedMask, values: torch.Tensor, *,
                      out: torch.Tensor | None = None, backend: str | None = None) -> tuple[torch.Tensor, int]:
    """A copy of `target` whose masked entries take `values` (from `masked_values`), and the number of entries whose
    bits changed. Equals masked_restore(target, source, mask) for values = masked_values(source cast, mask)."""
    values = values.to(device=target.device, dtype=target.dtype)
    return masked_scatter(target, mask.to(target.device), values, out=out, backend=backend)
