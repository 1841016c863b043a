"""Stage 2: safety-critical neurons, one mask per LoRA factor of the reference (docs/algorithm.md §3).

`masks_from_statistics` turns calibration statistics into masks (pure, no model); `score` runs the calibration
engine the method needs and then calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nlsr_fast import methods
from nlsr_fast.config import Preset, resolve_preset
from nlsr_fast.ops import PackedMask
from nlsr_fast.pipeline._types import Factors, Masks

__all__ = ["masks_from_statistics", "score", "sequential_transform"]

log = logging.getLogger(__name__)


def masks_from_statistics(
    method: str,
    ref_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    sparsity: float,
    preset: Preset | str = "paper",
    stats: Mapping[str, Any] | None = None,
    grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    seed: int = 42,
    backend: str | None = None,
) -> Masks:
    """Masks of every module from its calibration statistics.

    Args:
        method: one of METHODS.
        ref_factors: {module: (A_e (r, d_in), B_e (d_out, r))} of the reference, in model order.
        sparsity: s in [0, 1]; each mask keeps the top 1 - s share (per matrix for low_rank, per row otherwise).
        preset: Preset or name (low_rank count offset).
        stats: {module: ModuleStats(gram (r, r), x_sq (d_in,), z_sq (r,), n_tokens, n_samples)} for low_rank / wanda.
        grads: {module: (sum|dL/dA| (r, d_in), sum|dL/dB| (d_out, r))} for snip / pref_snip.
        seed: seed of the `random` masks: the mask of key "<module>.lora_A" / "<module>.lora_B" is
            random_row_mask(shape, 1 - s, random_stream(seed, key)), whatever the other modules and their order.
        backend: ops backend; None picks the fastest available.
    Returns:
        {module: (mask_A, mask_B)} in ref_factors' order.
    """
    from nlsr_fast.lora import lora_mask_keys  # function-local: nlsr_fast.lora imports this module

    spec = methods.get(method, "lora")
    preset = resolve_preset(preset)
    source: Mapping[str, Any] | None = None
    if spec.needs_calibration:
        source = grads if spec.gradients else stats
        if source is None:
            raise ValueError(f"method {method!r} needs calibration {'grads' if spec.gradients else 'stats'}")
        missing = [name for name in ref_factors if name not in source]
        if missing:
            raise ValueError(f"method {method!r}: no calibration statistics for modules {missing[:5]}")
    assert spec.lora_masks is not None, f"method {method!r} has no LoRA masks"
    return {name: spec.lora_masks(a, b, None if source is None else source[name], sparsity=sparsity, preset=preset,
                                  seed=seed, module=name, keys=lora_mask_keys(name), backend=backend)
            for name, (a, b) in ref_factors.items()}


def sequential_transform(
    method: str,
    ref_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    sparsity: float,
    preset: Preset | str = "paper",
    backend: str | None = None,
    cache: dict[str, tuple[PackedMask, PackedMask]] | None = None,
) -> Callable[[int, Mapping[str, Any]], Factors]:
    """The engine's `transform` for sequential calibration: the factors that recompute a layer's outputs.

    low_rank: the projected factors (W~_A, W~_B) of calib.lowrank.project_factors; wanda: the masked factors
    (M_A*A_e, M_B*B_e). The masks of both are stored in `cache` so they are not computed twice.
    """
    spec = methods.get(method)
    if not spec.sequential:
        sequential = [name for name, m in methods.METHODS.items() if m.sequential]
        raise ValueError(f"sequential calibration applies to {sequential}, got {method!r}")
    preset = resolve_preset(preset)

    def transform(layer: int, layer_stats: Mapping[str, Any]) -> Factors:
        out: Factors = {}
        for name, st in layer_stats.items():
            a, b = ref_factors[name]
            if spec.project is not None:  # low_rank: one eigen-decomposition gives the projection and the masks
                out[name], masks = spec.project(a, b, st, sparsity=sparsity, preset=preset, module=name,
                                                backend=backend)
            else:  # the masked factors
                assert spec.lora_masks is not None
                masks = spec.lora_masks(a, b, st, sparsity=sparsity, preset=preset, module=name, backend=backend)
                out[name] = (a * masks[0].to_bool().to(a.device), b * masks[1].to_bool().to(b.device))
            if cache is not None:
                cache[name] = masks
        log.debug("sequential transform of layer %d: %d modules", layer, len(out))
        return out

    return transform


def score(
    method: str,
    ref_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    sparsity: float,
    preset: Preset | str = "paper",
    seed: int = 42,
    base: Any = None,
    calib: Any = None,
    scales: Mapping[str, float] | None = None,
    sequential: bool = True,
    micro_batch: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    reduce: Callable[[dict[str, Any]], Any] | None = None,
    checkpoint: Any = None,
) -> Masks:
    """Masks of the reference adapter for `method`, running the calibration it needs.

    Args:
        method: one of METHODS.
        ref_factors: {module: (A_e, B_e)} in model order.
        sparsity: s; masks keep the top 1 - s.
        preset: Preset or name.
        seed: seed of `random`.
        base: io.CheckpointReader of the base checkpoint (all methods but random).
        calib: calib.data.CalibrationSet (all methods but random; pairs for pref_snip).
        scales: {module: LoRA scale s} of the reference adapter (default 1.0).
        sequential: recompute each layer with its projected (low_rank) / masked (wanda) factors.
        micro_batch, dtype, device: calibration forward settings (None = engine defaults).
        backend: ops backend.
        progress: optional callback(done_layers, total) passed to the engine.
        reduce: for several processes, sums statistics over them in place ({module: stats or grads}); called on
            each layer's statistics before the sequential transform, else on all statistics before the masks.
        checkpoint: a resume.LayerCheckpoint for the statistics pass (low_rank, wanda), or None.
    Returns:
        {module: (mask_A, mask_B)}.
    """
    preset = resolve_preset(preset)
    spec = methods.get(method, "lora")
    if not spec.needs_calibration:
        return masks_from_statistics(method, ref_factors, sparsity=sparsity, preset=preset, seed=seed, backend=backend)
    if base is None or calib is None:
        raise ValueError(f"method {method!r} needs the base checkpoint and calibration data")
    from nlsr_fast.calib import engine

    scales = scales or {}
    factors = {name: (a, b, float(scales.get(name, 1.0))) for name, (a, b) in ref_factors.items()}
    engine_kw: dict[str, Any] = {"micro_batch": micro_batch, "dtype": dtype, "progress": progress}
    if device is not None:
        engine_kw["device"] = device
    if not spec.gradients:
        cache: dict[str, tuple[PackedMask, PackedMask]] = {}
        transform = (
            sequential_transform(method, ref_factors, sparsity=sparsity, preset=preset, backend=backend, cache=cache)
            if sequential
            else None
        )
        if transform is not None and reduce is not None:
            inner = transform

            def transform(layer: int, layer_stats: Mapping[str, Any]) -> Factors:
                reduce(dict(layer_stats))
                return inner(layer, layer_stats)

        stats = engine.collect_lora_statistics(
            base, factors, calib, sequential=sequential, transform=transform, checkpoint=checkpoint, **engine_kw
        )
        if reduce is not None and not sequential:
            reduce(stats)
        masks = masks_from_statistics(
            method,
            {k: v for k, v in ref_factors.items() if k not in cache},
            sparsity=sparsity,
            preset=preset,
            stats=stats,
            backend=backend,
        )
        return {name: cache[name] if name in cache else masks[name] for name in ref_factors}
    grads = engine.lora_gradient_scores(
        base, factors, calib, loss=str(spec.loss), accumulate=preset.snip_accumulate, **engine_kw
    )
    if reduce is not None:
        reduce(grads)
    return masks_from_statistics(method, ref_factors, sparsity=sparsity, preset=preset, grads=grads, backend=backend)
