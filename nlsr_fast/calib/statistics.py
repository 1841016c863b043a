"""The statistics pass: forward-only calibration statistics, one decoder layer at a time (docs/algorithm.md §3).

`collect_lora_statistics` gathers, per adapted linear of a reference LoRA adapter, the r×r Gram of z_t = A·x_t
(low_rank) and the squared inputs of both factors (wanda). `collect_dense_statistics` gathers, per target linear of
a dense reference model, the squared inputs Σ_t x_t² (dense wanda). Both run the model runtime of
`calib.runtime` (see its docstring for the reader protocol and the memory bound).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nlsr_fast.calib.data import CalibrationSet
from nlsr_fast.calib.runtime import (
    OUTPUT_ONLY_BLOCK,
    OUTPUT_ONLY_LINEAR,
    Factors,
    _Ctx,
    _embed_all,
    _find_linear,
    _layer_forward,
    _micro_batches,
    _Model,
    _modules_by_layer,
    _open_reader,
    _ResponseRowsMLP,
    _targets_by_layer,
    _wrap,
    _wrap_dense,
)

__all__ = ["ModuleStats", "DenseStats", "collect_lora_statistics", "collect_dense_statistics"]

logger = logging.getLogger(__name__)


@dataclass
class ModuleStats:
    """Statistics of one adapted linear over response tokens (x_t its input, z_t = A·x_t).

    gram: (r, r) float64, Σ_t z_t z_tᵀ.  x_sq: (d_in,) float64, Σ_t x_t².  z_sq: (r,) float64, Σ_t z_t².
    n_tokens: response tokens counted.  n_samples: sequences counted.
    """

    gram: torch.Tensor
    x_sq: torch.Tensor
    z_sq: torch.Tensor
    n_tokens: int = 0
    n_samples: int = 0


@dataclass
class DenseStats:
    """Statistics of one dense target linear over response tokens (x_t its input).

    x_sq: (d_in,) float64, Σ_t x_t².  n_tokens: response tokens counted.  n_samples: sequences counted.
    Dense wanda scores entry (i, j) as |ΔW_ij|·sqrt(x_sq_j / n_samples).
    """

    x_sq: torch.Tensor
    n_tokens: int = 0
    n_samples: int = 0


Transform = Callable[[int, dict[str, ModuleStats]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _new_stats(factors: Factors, names: list[str], device: torch.device) -> dict[str, ModuleStats]:
    out = {}
    for n in names:
        A = factors[n][0]
        r, d_in = A.shape
        f64 = torch.float64
        out[n] = ModuleStats(torch.zeros(r, r, dtype=f64, device=device), torch.zeros(d_in, dtype=f64, device=device),
                             torch.zeros(r, dtype=f64, device=device))
    return out


def _stats_to_cpu(stats: dict[str, ModuleStats]) -> dict[str, ModuleStats]:
    return {n: ModuleStats(s.gram.cpu(), s.x_sq.cpu(), s.z_sq.cpu(), s.n_tokens, s.n_samples)
            for n, s in stats.items()}


def _resume_point(checkpoint: Any, stats_cls: type, model: Any, batches: list[Any]) -> tuple[int, list[Any], dict]:
    """(first layer to run, hidden states at its input, statistics of the layers before it): from the checkpoint
    when it holds a finished layer, else (0, the embeddings, {})."""
    state = checkpoint.load(stats_cls) if checkpoint is not None else None
    if state is not None:
        logger.info("calibration resumes at layer %d of %d", state[0], model.n_layers)
        return state
    return 0, _embed_all(model, batches), {}


def collect_lora_statistics(
    base: Any,
    factors: Factors,
    calib: CalibrationSet,
    *,
    sequential: bool = False,
    transform: Transform | None = None,
    micro_batch: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Any = None,
) -> dict[str, ModuleStats]:
    """Per-module statistics of the reference adapter over the calibration response tokens, one layer at a time.

    base: a reader (see `calib.runtime`; e.g. a `CheckpointReader`) or a checkpoint folder of a llama / mistral /
        qwen2 decoder.
    factors: module name ("model.layers.ℓ.self_attn.q_proj") → (A (r, d_in), B (d_out, r), scale) of the reference.
    calib: samples (or pairs, whose chosen and rejected sequences are both used).
    sequential: after layer ℓ's statistics, `transform(ℓ, stats_of_layer_ℓ)` returns replacement (A, B) for any of
        that layer's modules, and layer ℓ's outputs are recomputed with them before feeding layer ℓ+1 (the released
        schedule for low_rank / wanda at ~2 layer-forwards per sample per layer).
    micro_batch: sequences per micro-batch; default packs up to DEFAULT_TOKENS_PER_BATCH padded tokens.
    dtype: forward dtype, default the base checkpoint's; statistics are float64 regardless.
    checkpoint: a layer checkpoint (nlsr_fast.resume.LayerCheckpoint): the pass starts after the last saved layer
        and saves the layer-boundary state as it goes, so a killed run resumes from finished layers.
    Returns module name → ModuleStats (on the CPU), in the order of `factors`.
    """
    if sequential and transform is None:
        raise ValueError("sequential=True needs a transform")
    device = torch.device(device)
    reader = _open_reader(base)
    model = _Model(reader, dtype, device)
    by_layer = _modules_by_layer(model, factors)
    seqs = calib.sequences()
    if not seqs:
        raise ValueError("calibration set is empty")
    batches = _micro_batches(calib, micro_batch, pairs_together=False, sort=True)
    logger.info("calibration statistics: %d sequences in %d micro-batches, %d layers, dtype %s, sequential=%s",
                len(seqs), len(batches), model.n_layers, model.dtype, sequential)
    start, hs, result = _resume_point(checkpoint, ModuleStats, model, batches)
    ctx = _Ctx()
    for idx in range(start, model.n_layers):
        names = by_layer[idx]
        layer = model.layer(idx)
        stats = _new_stats(factors, names, device)
        mods = _wrap(layer, idx, factors, names, ctx, stats)
        # Sequential: this forward only gathers statistics (the outputs are recomputed with the new factors below),
        # so the MLP runs on the response rows only and its output-only linear is skipped; the inputs of every
        # linear at the response rows, and so the statistics, are the same.
        tail = mods.get(f"model.layers.{idx}.{OUTPUT_ONLY_LINEAR}")
        if tail is not None:
            tail.output_unused = True
        block = getattr(layer, OUTPUT_ONLY_BLOCK, None) if sequential else None
        if block is not None:
            setattr(layer, OUTPUT_ONLY_BLOCK, _ResponseRowsMLP(block, ctx))
        with torch.no_grad():
            ctx.collect, ctx.stats_only = True, sequential
            for bi, batch in enumerate(batches):
                ctx.token_mask = batch.response.to(device)
                out = _layer_forward(model, layer, idx, batch, hs[bi])
                ctx.end_batch()
                if not sequential:
                    hs[bi] = out.cpu()
                del out
            ctx.collect, ctx.stats_only, ctx.token_mask = False, False, None
            if block is not None:
                setattr(layer, OUTPUT_ONLY_BLOCK, block)
            if sequential:
                assert transform is not None
                layer_stats = _stats_to_cpu(stats)
                new = transform(idx, layer_stats) or {}
                for name, fac in new.items():
                    if name not in mods:
                        raise ValueError(f"transform for layer {idx} returned factors for {name!r}, not a module "
                                         f"of that layer ({names})")
                    mods[name].set_factors(fac[0], fac[1])
                for bi, batch in enumerate(batches):
                    hs[bi] = _layer_forward(model, layer, idx, batch, hs[bi]).cpu()
        # The transform's view of the statistics when sequential (a distributed caller sums them in place there).
        result.update(layer_stats if sequential else _stats_to_cpu(stats))
        del layer, mods
        if checkpoint is not None:
            checkpoint.save(idx + 1, model.n_layers, hs, result)
        if progress is not None:
            progress(idx + 1, model.n_layers)
    return {n: result[n] for n in factors}


def collect_dense_statistics(
    reader: Any,
    targets: Sequence[str],
    calib: CalibrationSet,
    *,
    micro_batch: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Any = None,
) -> dict[str, DenseStats]:
    """Σ_t x_t² over the calibration response tokens of the input x_t of each target linear of a dense model.

    reader: a reader (see `calib.runtime`) of the model to run, in dense mode the reference (W_e for the targets,
        the base tensors elsewhere), or a checkpoint folder.
    targets: module names without ".weight" ("model.layers.0.mlp.down_proj"), each a linear of a decoder layer.
    calib: samples (or pairs, whose chosen and rejected sequences are both used).
    micro_batch: sequences per micro-batch; default packs up to DEFAULT_TOKENS_PER_BATCH padded tokens.
    dtype: forward dtype, default the reader's embedding dtype; x_sq is accumulated in float64 from float32 squares.
    progress: progress(done_layers, n_layers) after each layer.
    checkpoint: a layer checkpoint, as for `collect_lora_statistics`.
    Returns target name → DenseStats (x_sq (d_in,) float64 on the CPU), in the order of `targets`.
    Memory: the hidden states of every sample (as for the LoRA pass), one layer, d_in float64 per target.
    """
    device = torch.device(device)
    model = _Model(_open_reader(reader), dtype, device)
    by_layer = _targets_by_layer(model, targets)
    seqs = calib.sequences()
    if not seqs:
        raise ValueError("calibration set is empty")
    batches = _micro_batches(calib, micro_batch, pairs_together=False, sort=True)
    logger.info("dense calibration statistics: %d sequences in %d micro-batches, %d layers, %d targets, dtype %s",
                len(seqs), len(batches), model.n_layers, len(targets), model.dtype)
    start, hs, result = _resume_point(checkpoint, DenseStats, model, batches)
    ctx = _Ctx()
    for idx in range(start, model.n_layers):
        names = by_layer[idx]
        layer = model.layer(idx)
        stats: dict[str, DenseStats] = {}
        for n in names:
            d_in = int(_find_linear(layer, idx, n, "target")[2].in_features)
            stats[n] = DenseStats(torch.zeros(d_in, dtype=torch.float64, device=device))
        _wrap_dense(layer, idx, names, ctx, stats)
        with torch.no_grad():
            ctx.collect = True
            for bi, batch in enumerate(batches):
                ctx.token_mask = batch.response.to(device)
                hs[bi] = _layer_forward(model, layer, idx, batch, hs[bi]).cpu()
                ctx.end_batch()
            ctx.collect, ctx.token_mask = False, None
        for n, st in stats.items():
            result[n] = DenseStats(st.x_sq.cpu(), st.n_tokens, st.n_samples)
        del layer
        if checkpoint is not None:
            checkpoint.save(idx + 1, model.n_layers, hs, result)
        if progress is not None:
            progress(idx + 1, model.n_layers)
    return {n: result[n] for n in targets}
