"""Stage 3a: per-module similarity of the fine-tuned and reference adapters under the reference masks
(docs/algorithm.md §4)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping

import torch

from nlsr_fast.ops import PackedMask, lora_masked_cosine

__all__ = ["logged_warnings", "similarity"]

log = logging.getLogger(__name__)


def similarity(
    ft_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ref_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    masks: Mapping[str, tuple[PackedMask, PackedMask]],
    *,
    ref_scale: float = 1.0,
    backend: str | None = None,
    warn: bool = True,
) -> dict[str, float]:
    """S_m = cos((M_B*B_t)(M_A*A_t), (M_B*B_e)(M_A*A_e)) for every module, through r x r Grams.

    Args:
        ft_factors: {module: (A_t (r, d_in), B_t (d_out, r))}, in model order.
        ref_factors: {module: (A_e, B_e)}, same shapes (any float dtypes).
        masks: {module: (mask_A (r, d_in), mask_B (d_out, r))} from the reference.
        ref_scale: the reference is ref_scale times ref_factors, in fp32 (a stored aligned adapter and its
            amplification: see lora.Reference).
        backend: ops backend; None picks the fastest available.
        warn: also issue each zero-norm warning as a Python RuntimeWarning (it is always logged). The streaming
            executor passes False: the CLI shows logs and Python warnings both, so each module's warning would
            print twice.
    Returns:
        {module: S_m} as Python floats in ft_factors' order; a zero-norm module gives 0.0 with a warning naming it.
    """
    out: dict[str, float] = {}
    for name, (a_t, b_t) in ft_factors.items():
        if name not in ref_factors or name not in masks:
            raise ValueError(f"module {name!r} of the fine-tuned adapter has no reference factors or masks")
        a_e, b_e = ref_factors[name]
        mask_a, mask_b = masks[name]
        device = a_t.device
        with logged_warnings(warn):
            a_t, b_t, a_e, b_e = (_kernel_input(x, device) for x in (a_t, b_t, a_e, b_e))
            out[name] = lora_masked_cosine(
                a_t,
                b_t,
                a_e,
                b_e,
                mask_a.to(device),
                mask_b.to(device),
                e_scale=ref_scale,
                name=name,
                backend=backend,
            )
    return out


def _kernel_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """bf16/fp16/fp32 as stored: every backend converts them exactly (the C++ core as it packs, Triton to fp32, the
    reference to fp64); any other dtype in fp32."""
    x = x.to(device)
    return x if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else x.float()


@contextlib.contextmanager
def logged_warnings(warn: bool = False) -> Iterator[None]:
    """Log the ops' warnings raised inside (a zero-norm module, say): the CLI shows logs. With `warn` they are
    re-issued as Python warnings too, for in-memory callers; one line per warning on the CLI either way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.warning("%s", w.message)
        if warn:
            warnings.warn(str(w.message), RuntimeWarning, stacklevel=3)
