"""The gradient pass: per-sample gradient scores (snip, pref_snip) by a layer-streamed forward and backward
(docs/algorithm.md §3).

Schedule: a streamed forward keeps every layer's input per micro-batch (on the CPU); the head gives each sample's
loss and ∂L/∂h_L; a streamed backward then loads one layer at a time (ℓ = L−1 … 0), recomputes its forward with
autograd from the stored input and backpropagates the incoming gradient. The wrapped linears of the layer capture
their inputs and output gradients, from which per-sequence weight gradients follow exactly (sequences never interact
and padded positions get zero gradient), so a micro-batch may hold many samples; a pair's two sequences always share
a micro-batch.

`lora_gradient_scores` scores the factors of a reference LoRA adapter and returns every module's scores;
`dense_gradient_scores` scores the full weight of each target linear of a dense reference and hands them over one
layer at a time. Both run the model runtime of `calib.runtime` (see its docstring for the reader protocol).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nlsr_fast.calib.data import CalibrationSet, PairSample, Sample
from nlsr_fast.calib.runtime import (
    Factors,
    _Batch,
    _Ctx,
    _DenseTap,
    _embed_all,
    _layer_forward,
    _LoraLinear,
    _micro_batches,
    _Model,
    _modules_by_layer,
    _open_reader,
    _targets_by_layer,
    _wrap,
    _wrap_dense,
)

__all__ = ["lora_gradient_scores", "dense_gradient_scores"]

logger = logging.getLogger(__name__)

#: on_layer(layer index, {target name: Σ_n |∂L_n/∂W| (d_out, d_in) float32}) of `dense_gradient_scores`.
OnLayer = Callable[[int, dict[str, torch.Tensor]], None]


def _response_logprobs(model: _Model, norm: nn.Module, w_head: torch.Tensor, batch: _Batch,
                       h: torch.Tensor) -> torch.Tensor:
    """(b,) Σ over response targets of log p(token_t | tokens_<t), float32 (logits of position t-1 predict t)."""
    dev = model.device
    logits = F.linear(norm(h), w_head).to(torch.float32)  # (b, T, V)
    if model.logit_softcap is not None:  # as Gemma3ForCausalLM does (a no-op for the other families)
        logits = torch.tanh(logits / model.logit_softcap) * model.logit_softcap
    ids = batch.ids.to(dev)
    tgt = (batch.response & batch.valid).to(dev)[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * tgt).sum(1)


def _n_targets(batch: _Batch) -> torch.Tensor:
    return (batch.response & batch.valid)[:, 1:].sum(1)


def _check_gradient_args(calib: CalibrationSet, loss: str, accumulate: str) -> None:
    if loss not in ("nll", "dpo"):
        raise ValueError(f"loss must be 'nll' or 'dpo', got {loss!r}")
    if accumulate not in ("per_sample", "running"):
        raise ValueError(f"accumulate must be 'per_sample' or 'running', got {accumulate!r}")
    if not calib.samples:
        raise ValueError("calibration set is empty")
    if (loss == "dpo") != calib.is_pairs:
        raise ValueError(f"loss={loss!r} needs a calibration set of {'pairs' if loss == 'dpo' else 'samples'}")


def _activation_chunks(calib: CalibrationSet, model: _Model, budget: int | None) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) sample ranges whose stored layer inputs, (L+1) x tokens x hidden, fit in `budget` bytes."""
    if budget is None:
        try:
            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
        except (ValueError, OSError, AttributeError):
            budget = 8 << 30
    hidden = int(model.config.hidden_size)
    per_token = (model.n_layers + 1) * hidden * torch.empty((), dtype=model.dtype).element_size()
    chunks: list[tuple[int, int]] = []
    lo, used = 0, 0
    for i, s in enumerate(calib.samples):
        seqs: list[Sample] = [s.chosen, s.rejected] if isinstance(s, PairSample) else [s]  # type: ignore[list-item]
        # x2 for dpo: the reference-free stream pi_0 keeps its own hidden states alongside.
        cost = sum(q.n_tokens for q in seqs) * per_token * (2 if isinstance(s, PairSample) else 1)
        if i > lo and used + cost > budget:
            chunks.append((lo, i))
            lo, used = i, 0
        used += cost
    chunks.append((lo, len(calib.samples)))
    return chunks


class _Sink:
    """What the gradient stream does with a layer: install its wrappers, and per layer of the backward sweep start,
    consume the captures of each micro-batch, finish."""

    def install(self, layer: nn.Module, idx: int) -> dict[str, Any]:
        raise NotImplementedError

    def start(self, idx: int, mods: dict[str, Any]) -> None:
        raise NotImplementedError

    def consume(self, idx: int, mods: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, idx: int) -> None:
        raise NotImplementedError


def _gradient_stream(model: _Model, batches: list[_Batch], sink: _Sink, ctx: _Ctx, *, loss: str, beta: float,
                     device: torch.device, progress: Callable[[int, int], None] | None) -> None:
    """One forward + backward stream over `batches` (see the module docstring), feeding `sink` layer by layer."""
    for b in batches:
        bad = [i for j, i in enumerate(b.index) if int(_n_targets(b)[j]) == 0]
        if bad:
            raise ValueError(f"calibration sequence(s) {bad} have no predictable response token (a response "
                             f"token needs a token before it)")
    L = model.n_layers
    total = 2 * L

    # forward: store each layer's input per micro-batch; for dpo also run π_0 alongside (not stored).
    acts: list[list[torch.Tensor]] = []
    hs = _embed_all(model, batches)
    hs0 = [h.clone() for h in hs] if loss == "dpo" else None
    with torch.no_grad():
        for idx in range(L):
            layer = model.layer(idx)
            sink.install(layer, idx)
            acts.append(hs)
            hs = [_layer_forward(model, layer, idx, b, h).cpu() for b, h in zip(batches, hs, strict=True)]
            if hs0 is not None:
                ctx.adapter_on = False
                hs0 = [_layer_forward(model, layer, idx, b, h).cpu() for b, h in zip(batches, hs0, strict=True)]
                ctx.adapter_on = True
            del layer
            if progress is not None:
                progress(idx + 1, total)

    # head: per-sample losses and dL/dh_L
    norm, w_head = model.head()
    grads: list[torch.Tensor] = []
    for bi, batch in enumerate(batches):
        h = hs[bi].to(device).requires_grad_(True)
        with torch.enable_grad():
            lp = _response_logprobs(model, norm, w_head, batch, h)
            if loss == "nll":
                losses = -lp / _n_targets(batch).to(device)
            else:
                assert hs0 is not None
                with torch.no_grad():
                    lp0 = _response_logprobs(model, norm, w_head, batch, hs0[bi].to(device))
                margin = (lp[0::2] - lp[1::2]) - (lp0[0::2] - lp0[1::2])
                losses = -F.logsigmoid(beta * margin)
            (g,) = torch.autograd.grad(losses.sum(), h)
        grads.append(g.cpu())
    del norm, w_head, hs, hs0

    # backward, layer by layer
    for step, idx in enumerate(reversed(range(L))):
        layer = model.layer(idx)
        ctx.capture = True
        mods = sink.install(layer, idx)
        sink.start(idx, mods)
        for bi, batch in enumerate(batches):
            x = acts[idx][bi].to(device).requires_grad_(True)
            with torch.enable_grad():
                out = _layer_forward(model, layer, idx, batch, x)
                (gx,) = torch.autograd.grad(out, x, grads[bi].to(device))
            grads[bi] = gx.cpu()
            sink.consume(idx, mods)
        ctx.capture = False
        acts[idx] = []
        del layer, mods
        sink.finish(idx)
        if progress is not None:
            progress(L + step + 1, total)


# --------------------------------------------------------------------------------------------------------------------
# LoRA factors


class _LoraSink(_Sink):
    """Σ_n |∂L_n/∂A|, Σ_n |∂L_n/∂B| (or the running variant) of every adapted linear; `carry` holds the running sums
    across chunks."""

    def __init__(self, factors: Factors, by_layer: dict[int, list[str]], ctx: _Ctx, *, accumulate: str,
                 per_item: int, device: torch.device, carry: dict[str, list[torch.Tensor]]) -> None:
        self.factors, self.by_layer, self.ctx = factors, by_layer, ctx
        self.accumulate, self.per_item, self.device, self.carry = accumulate, per_item, device, carry
        self.scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.acc: dict[str, list[torch.Tensor]] = {}
        self.running: dict[str, list[torch.Tensor]] = {}

    def install(self, layer: nn.Module, idx: int) -> dict[str, Any]:
        return dict(_wrap(layer, idx, self.factors, self.by_layer[idx], self.ctx, None))

    def start(self, idx: int, mods: dict[str, Any]) -> None:
        f, dev = self.factors, self.device
        self.acc = {n: [torch.zeros(f[n][0].shape, device=dev), torch.zeros(f[n][1].shape, device=dev)]
                    for n in self.by_layer[idx]}
        self.running = {n: self.carry.setdefault(n, [torch.zeros_like(a[0]), torch.zeros_like(a[1])])
                        for n, a in self.acc.items()}

    def consume(self, idx: int, mods: dict[str, Any]) -> None:
        acc, running = self.acc, self.running
        for n, mod in mods.items():
            assert isinstance(mod, _LoraLinear)
            ga, gb = mod.per_sample_grads()  # per sequence
            if self.per_item == 2:
                ga = ga[0::2] + ga[1::2]
                gb = gb[0::2] + gb[1::2]
            if self.accumulate == "per_sample":
                acc[n][0] += ga.abs().sum(0)
                acc[n][1] += gb.abs().sum(0)
            else:
                for j in range(ga.shape[0]):
                    running[n][0] += ga[j]
                    running[n][1] += gb[j]
                    acc[n][0] += running[n][0].abs()
                    acc[n][1] += running[n][1].abs()

    def finish(self, idx: int) -> None:
        for n in self.by_layer[idx]:
            self.scores[n] = (self.acc[n][0].cpu(), self.acc[n][1].cpu())
        self.acc, self.running = {}, {}


def lora_gradient_scores(
    base: Any,
    factors: Factors,
    calib: CalibrationSet,
    *,
    loss: str = "nll",
    beta: float = 0.1,
    accumulate: str = "per_sample",
    micro_batch: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    max_activation_bytes: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Σ_n |∂L_n/∂A| (r, d_in) and Σ_n |∂L_n/∂B| (d_out, r), float32, per module of the reference adapter.

    base: a reader (see `calib.runtime`) or a checkpoint folder of the base model.
    loss="nll" (snip): L_n = mean NLL over sample n's response tokens (π = base + reference adapter).
    loss="dpo" (pref_snip, `calib` of pairs): L_n = −log σ(β[(log π(y_c) − log π(y_r)) − (log π_0(y_c) −
        log π_0(y_r))]), π_0 = base without adapter, log-probs summed over response tokens.
    accumulate="per_sample" (preset paper): Σ_n |g_n|. "running" (preset official, grads never zeroed): Σ_n |Σ_{j≤n}
        g_j|, samples taken in calibration order.

    Per-sample factor gradients come from the captured inputs x_t, z_t = A·x_t and output gradients g_t of each
    adapted linear: ∂L/∂B = s·Σ_t g_t z_tᵀ, ∂L/∂A = s·Σ_t (Bᵀg_t) x_tᵀ, summed per sequence with einsum.

    The stored layer inputs take (L+1) x tokens x hidden elements. When that exceeds `max_activation_bytes`
    (default: a quarter of physical memory), the samples are processed in consecutive chunks that fit, each with its
    own forward and backward stream (the base is read twice per chunk); the sums are exact either way, and the
    running sum of preset official is carried from one chunk to the next.
    """
    _check_gradient_args(calib, loss, accumulate)
    device = torch.device(device)
    reader = _open_reader(base)
    model = _Model(reader, dtype, device)
    chunks = _activation_chunks(calib, model, max_activation_bytes)
    if len(chunks) > 1:
        logger.info("gradient scores: %d samples in %d chunks to keep stored activations under the budget",
                    len(calib.samples), len(chunks))
    carry: dict[str, list[torch.Tensor]] = {}
    total: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for lo, hi in chunks:
        part = CalibrationSet(samples=calib.samples[lo:hi], meta=calib.meta)  # type: ignore[arg-type]
        got = _gradient_scores_pass(model, factors, part, loss=loss, beta=beta, accumulate=accumulate,
                                    micro_batch=micro_batch, device=device, progress=progress, carry=carry)
        for n, (ga, gb) in got.items():
            total[n] = (ga, gb) if n not in total else (total[n][0] + ga, total[n][1] + gb)
    return total


def _gradient_scores_pass(
    model: _Model,
    factors: Factors,
    calib: CalibrationSet,
    *,
    loss: str,
    beta: float,
    accumulate: str,
    micro_batch: int | None,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
    carry: dict[str, list[torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward + backward stream over `calib` (see lora_gradient_scores); `carry` holds the running sums."""
    by_layer = _modules_by_layer(model, factors)
    per_item = 2 if loss == "dpo" else 1
    batches = _micro_batches(calib, micro_batch, pairs_together=per_item == 2, sort=False)
    logger.info("gradient scores (%s, %s): %d sequences in %d micro-batches, %d layers, dtype %s",
                loss, accumulate, per_item * len(calib.samples), len(batches), model.n_layers, model.dtype)
    ctx = _Ctx()
    sink = _LoraSink(factors, by_layer, ctx, accumulate=accumulate, per_item=per_item, device=device, carry=carry)
    _gradient_stream(model, batches, sink, ctx, loss=loss, beta=beta, device=device, progress=progress)
    return {n: sink.scores[n] for n in factors}


# --------------------------------------------------------------------------------------------------------------------
# dense weights


class _DenseSink(_Sink):
    """Σ_n |∂L_n/∂W| (or the running variant) of each target linear, handed to `on_layer` when a layer is done.

    With several chunks, the partial sums (and the running sums) of each layer wait in `spill` (files, one layer per
    file) between chunks; only the last chunk calls `on_layer`, with the complete sums."""

    def __init__(self, by_layer: dict[int, list[str]], ctx: _Ctx, *, accumulate: str, device: torch.device,
                 on_layer: OnLayer | None, spill: str | None, first: bool) -> None:
        self.by_layer, self.ctx, self.accumulate, self.device = by_layer, ctx, accumulate, device
        self.on_layer, self.spill, self.first = on_layer, spill, first
        self.acc: dict[str, torch.Tensor] = {}
        self.running: dict[str, torch.Tensor] = {}

    def install(self, layer: nn.Module, idx: int) -> dict[str, Any]:
        return dict(_wrap_dense(layer, idx, self.by_layer[idx], self.ctx, None))

    def _load(self, kind: str, idx: int) -> dict[str, torch.Tensor]:
        assert self.spill is not None
        got: dict[str, torch.Tensor] = torch.load(os.path.join(self.spill, f"{kind}_{idx}.pt"), weights_only=True)
        return {n: t.to(self.device) for n, t in got.items()}

    def _save(self, kind: str, idx: int, tensors: dict[str, torch.Tensor]) -> None:
        assert self.spill is not None
        torch.save({n: t.cpu() for n, t in tensors.items()}, os.path.join(self.spill, f"{kind}_{idx}.pt"))

    def start(self, idx: int, mods: dict[str, Any]) -> None:
        if self.spill is not None and not self.first:
            self.acc = self._load("sum", idx)
            if self.accumulate == "running":
                self.running = self._load("running", idx)
            return
        shapes = {n: tuple(m.base.weight.shape) for n, m in mods.items()}
        self.acc = {n: torch.zeros(shapes[n], dtype=torch.float32, device=self.device) for n in mods}
        if self.accumulate == "running":
            self.running = {n: torch.zeros(shapes[n], dtype=torch.float32, device=self.device) for n in mods}

    def consume(self, idx: int, mods: dict[str, Any]) -> None:
        for n, tap in mods.items():
            assert isinstance(tap, _DenseTap)
            x, g = tap.take_captured()
            x32, g32 = x.to(torch.float32), g.to(torch.float32)
            acc = self.acc[n]
            for j in range(x32.shape[0]):  # one (d_out, d_in) per-sample gradient at a time
                gj = g32[j].T @ x32[j]
                if self.accumulate == "per_sample":
                    acc += gj.abs_()
                else:
                    run = self.running[n]
                    run += gj
                    acc += run.abs()
                del gj

    def finish(self, idx: int) -> None:
        acc, running = self.acc, self.running
        self.acc, self.running = {}, {}
        if self.on_layer is None:  # not the last chunk: keep the partial sums for the next one
            self._save("sum", idx, acc)
            if self.accumulate == "running":
                self._save("running", idx, running)
            return
        if self.spill is not None:  # last of several chunks: the spilled files are no longer needed
            for kind in ("sum", "running"):
                path = os.path.join(self.spill, f"{kind}_{idx}.pt")
                if os.path.exists(path):
                    os.remove(path)
        del running
        if not self.by_layer[idx]:
            return
        scores = {n: acc.pop(n) for n in self.by_layer[idx]}
        self.on_layer(idx, scores)  # handed over: no reference stays here once it returns


def dense_gradient_scores(
    reader: Any,
    targets: Sequence[str],
    calib: CalibrationSet,
    *,
    on_layer: OnLayer,
    loss: str = "nll",
    accumulate: str = "per_sample",
    micro_batch: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    max_activation_bytes: int | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Σ_n |∂L_n/∂W| (d_out, d_in) float32 of each target linear of a dense model, handed over layer by layer.

    reader: a reader (see `calib.runtime`) of the model to differentiate, in dense mode the reference (W_e for the
        targets, the base tensors elsewhere), or a checkpoint folder.
    targets: module names without ".weight" ("model.layers.0.mlp.down_proj"), each a linear of a decoder layer.
    calib: samples. loss: "nll" only (snip: L_n = mean NLL over sample n's response tokens); the preference loss
        needs a second model π_0 and is not offered in dense mode.
    accumulate: "per_sample" (preset paper) Σ_n |g_n|; "running" (preset official, grads never zeroed)
        Σ_n |Σ_{j≤n} g_j|, samples taken in calibration order.
    on_layer: called as on_layer(ℓ, {target of layer ℓ: scores}) once per layer that has targets, in backward order
        (ℓ = L−1 … 0), as soon as that layer's backward is done. The score tensors are on `device` and handed over:
        the engine keeps no reference to them, so a caller that does not keep them either holds one layer at a time.
    max_activation_bytes: budget of the stored layer inputs, (L+1) × tokens × hidden (default: a quarter of
        physical memory). Over it, samples go in consecutive chunks, each with its own forward and backward stream;
        the partial sums of every layer (and the running sums) then wait between chunks in files under `spill_dir`
        (default: a temporary folder): d_out × d_in × 4 bytes per target, twice for "running". The sums are exact
        either way and `on_layer` is still called once per layer, with the complete sums, during the last chunk.
    Memory: the stored layer inputs + one layer's weights + one layer's scores (twice for "running") + one micro-batch's
    activations and one (d_out, d_in) per-sample gradient; it never holds two layers of scores.
    """
    if loss != "nll":
        raise ValueError(f"dense gradient scores support loss='nll' (snip) only, got {loss!r}")
    _check_gradient_args(calib, loss, accumulate)
    device = torch.device(device)
    model = _Model(_open_reader(reader), dtype, device)
    by_layer = _targets_by_layer(model, targets)
    chunks = _activation_chunks(calib, model, max_activation_bytes)
    ctx = _Ctx()

    def run(spill: str | None) -> None:
        for ci, (lo, hi) in enumerate(chunks):
            part = CalibrationSet(samples=calib.samples[lo:hi], meta=calib.meta)  # type: ignore[arg-type]
            batches = _micro_batches(part, micro_batch, pairs_together=False, sort=False)
            logger.info("dense gradient scores (%s, %s), chunk %d/%d: %d sequences in %d micro-batches, %d layers, "
                        "%d targets, dtype %s", loss, accumulate, ci + 1, len(chunks), hi - lo, len(batches),
                        model.n_layers, len(targets), model.dtype)
            last = ci == len(chunks) - 1
            sink = _DenseSink(by_layer, ctx, accumulate=accumulate, device=device,
                              on_layer=on_layer if last else None, spill=spill, first=ci == 0)
            _gradient_stream(model, batches, sink, ctx, loss=loss, beta=0.0, device=device, progress=progress)

    if len(chunks) == 1:
        run(None)
        return
    logger.info("dense gradient scores: %d samples in %d chunks to keep stored activations under the budget",
                len(calib.samples), len(chunks))
    with tempfile.TemporaryDirectory(prefix="nlsr_dense_grads_", dir=spill_dir) as spill:
        run(spill)
