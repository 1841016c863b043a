"""Layer-streamed calibration of a Llama-family decoder with a reference LoRA adapter (SPEC §3 "Streaming calibration").

Only one decoder layer is resident at a time. The engine embeds every calibration sequence once, then for each
layer ℓ materialises transformers' own decoder-layer class (built on the 'meta' device, then given the layer's
tensors from the base `CheckpointReader`), swaps each adapted linear for `_LoraLinear` (W0·x + scale·B(A·x), no
dropout), pushes every micro-batch through it and keeps the outputs on the CPU as layer ℓ+1's inputs. Rotary
embeddings are computed by the engine with the model's rotary class; the final norm and lm_head are loaded only
when a loss is needed.

Memory (statistics): samples × tokens × hidden (the hidden states, in the forward dtype) + one layer's weights +
one micro-batch's activations + the statistics (r² + d_in + r float64 per module). It does not grow with depth.
Memory (gradient scores): the layer-boundary activations of every layer are kept for the backward sweep,
(L+1) × samples × tokens × hidden, plus the same per-layer terms.

Padding: sequences of a micro-batch are right-padded; the boolean attention mask is causal & key-is-real (plus the
sliding window where the config has one), and each query may always see itself so that padded rows never go NaN.
Padded positions never count: statistics and losses read response positions only.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nlsr_fast.calib.data import CalibrationSet, PairSample, Sample

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModuleStats",
    "collect_lora_statistics",
    "lora_gradient_scores",
    "DEFAULT_TOKENS_PER_BATCH",
]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
DEFAULT_TOKENS_PER_BATCH = 8192
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_STR_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "F32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "BF16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "F16": torch.float16,
    "float64": torch.float64, "F64": torch.float64,
}

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
Transform = Callable[[int, dict[str, "ModuleStats"]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


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


# --------------------------------------------------------------------------------------------------------------------
# model pieces


def _as_dtype(d: Any) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and d in _STR_DTYPES:
        return _STR_DTYPES[d]
    if isinstance(d, str) and hasattr(torch, d) and isinstance(getattr(torch, d), torch.dtype):
        return getattr(torch, d)
    raise ValueError(f"unsupported dtype {d!r}")


def _open_reader(base: Any) -> Any:
    if isinstance(base, (str, os.PathLike)):
        from nlsr_fast.io import CheckpointReader  # the io layer; imported lazily

        return CheckpointReader(base)
    return base


class _Ctx:
    """State shared by the `_LoraLinear`s of the resident layer for the current micro-batch."""

    def __init__(self) -> None:
        self.adapter_on = True
        self.collect = False  # accumulate statistics
        self.capture = False  # keep inputs and output-grads for per-sample factor gradients
        self.token_mask: torch.Tensor | None = None  # (b, T) bool, response positions


class _LoraLinear(nn.Module):
    """y = W0·x (+ bias) + scale·B(A·x), accumulating `ModuleStats` over `ctx.token_mask` positions when collecting."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float, name: str, ctx: _Ctx,
                 stats: ModuleStats | None) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx
        self.scale = float(scale)
        self.stats = stats
        self.set_factors(A, B)
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._grad_out: torch.Tensor | None = None

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        w = self.base.weight
        if A.shape != (A.shape[0], w.shape[1]) or B.shape != (w.shape[0], A.shape[0]):
            raise ValueError(f"{self.name}: factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the base "
                             f"weight {tuple(w.shape)}")
        self.A = A.to(device=w.device, dtype=w.dtype)
        self.B = B.to(device=w.device, dtype=w.dtype)
        self.A32 = A.to(device=w.device, dtype=torch.float32)
        self.B32 = B.to(device=w.device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        if not ctx.adapter_on:
            return y
        z = F.linear(x, self.A)
        out = y + self.scale * F.linear(z, self.B)
        if ctx.collect:
            self._accumulate(x.detach(), z.detach())
        if ctx.capture and out.requires_grad:
            self.captured.append((x.detach(), z.detach()))
            out.register_hook(self._store_grad)
        return out

    def _store_grad(self, g: torch.Tensor) -> None:
        self._grad_out = g.detach()

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor, z: torch.Tensor) -> None:
        assert self.stats is not None and self.ctx.token_mask is not None
        mask = self.ctx.token_mask
        xs = x[mask]  # (N, d_in)
        if z.dtype in (torch.float32, torch.float64):
            zs = z[mask].to(torch.float64)
        else:  # low-precision forward: statistics from an fp32 product, as SPEC §3 asks for fp32 or wider
            zs = (xs.to(torch.float32) @ self.A32.T).to(torch.float64)
        st = self.stats
        st.gram += zs.T @ zs
        st.z_sq += zs.square().sum(0)
        st.x_sq += xs.to(torch.float32).square().sum(0, dtype=torch.float64)
        st.n_tokens += int(xs.shape[0])
        st.n_samples += int(mask.any(1).sum())

    def per_sample_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂/∂A (b, r, d_in), ∂/∂B (b, d_out, r)) per sequence of the last captured micro-batch, float32."""
        if len(self.captured) != 1 or self._grad_out is None:
            raise RuntimeError(f"{self.name}: expected one captured forward and its gradient, got "
                               f"{len(self.captured)} forwards")
        x, z = self.captured[0]
        g = self._grad_out.to(torch.float32)  # (b, T, d_out)
        u = g @ self.B32  # (b, T, r) = Bᵀ g_t
        ga = self.scale * torch.einsum("btr,bti->bri", u, x.to(torch.float32))
        gb = self.scale * torch.einsum("btd,btr->bdr", g, z.to(torch.float32))
        self.captured.clear()
        self._grad_out = None
        return ga, gb


class _Model:
    """The architecture-specific classes and the base checkpoint's key layout."""

    def __init__(self, reader: Any, dtype: torch.dtype | str | None, device: torch.device) -> None:
        cfg = dict(reader.config)
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not supported by the calibration engine; supported: "
                             f"{list(SUPPORTED_MODEL_TYPES)}")
        from transformers import AutoConfig

        cfg.pop("model_type")
        self.config = AutoConfig.for_model(mt, **cfg)
        self.config._attn_implementation = "sdpa"
        self.model_type = mt
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        prefix = _CLASS_PREFIX[mt]
        self.layer_cls = getattr(mod, f"{prefix}DecoderLayer")
        self.norm_cls = getattr(mod, f"{prefix}RMSNorm")
        self.rotary = getattr(mod, f"{prefix}RotaryEmbedding")(config=self.config).to(device)
        self.reader = reader
        self.device = device
        self.n_layers = int(self.config.num_hidden_layers)
        self.layer_keys: dict[int, list[str]] = {i: [] for i in range(self.n_layers)}
        self.keys = set(reader.keys())
        for k in self.keys:
            m = _LAYER_RE.match(k)
            if m and int(m.group(1)) < self.n_layers:
                self.layer_keys[int(m.group(1))].append(k)
        if "model.embed_tokens.weight" not in self.keys:
            raise ValueError("base checkpoint has no 'model.embed_tokens.weight'")
        self.dtype = _as_dtype(dtype) if dtype is not None else _as_dtype(reader.dtype("model.embed_tokens.weight"))
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- pieces ------------------------------------------------------------------------------------------------------

    def embed(self) -> torch.Tensor:
        return self.reader.get("model.embed_tokens.weight").to(device=self.device, dtype=self.dtype)

    def head(self) -> tuple[nn.Module, torch.Tensor]:
        """(final norm, lm_head weight (vocab, hidden)), loaded only for a loss."""
        norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.reader.get("model.norm.weight").to(device=self.device, dtype=self.dtype)
        norm.requires_grad_(False)
        key = "lm_head.weight" if "lm_head.weight" in self.keys else "model.embed_tokens.weight"
        return norm, self.reader.get(key).to(device=self.device, dtype=self.dtype)

    def layer(self, idx: int) -> nn.Module:
        """Decoder layer `idx` of the base checkpoint, materialised on `device` in `dtype`, frozen, eval mode."""
        prefix = f"model.layers.{idx}."
        with torch.device("meta"):
            layer = self.layer_cls(self.config, idx)
        want = set(layer.state_dict().keys())
        tensors = self.reader.get_many(sorted(self.layer_keys[idx]))
        sd = {k[len(prefix):]: v.to(device=self.device, dtype=self.dtype) for k, v in tensors.items()}
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        if missing or extra:
            raise ValueError(f"decoder layer {idx}: checkpoint tensors do not match {self.layer_cls.__name__} "
                             f"(missing {[prefix + k for k in missing]}, unexpected {[prefix + k for k in extra]})")
        layer.load_state_dict(sd, assign=True, strict=True)
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if t.is_meta:
                raise ValueError(f"decoder layer {idx}: {name} was not materialised")
        layer.eval()
        layer.requires_grad_(False)
        return layer

    def is_sliding(self, idx: int) -> bool:
        window = getattr(self.config, "sliding_window", None)
        if not window:
            return False
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return layer_types[idx] == "sliding_attention"
        return self.model_type == "mistral"

    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T not in self._rope_cache:
            pos = torch.arange(T, device=self.device)[None]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            self._rope_cache[T] = self.rotary(probe, pos)
        return self._rope_cache[T]


@dataclass
class _Batch:
    """A right-padded micro-batch: sequence indices, ids (b, T), valid (b, T), response (b, T)."""

    index: list[int]
    ids: torch.Tensor
    valid: torch.Tensor
    response: torch.Tensor

    def attn_mask(self, sliding_window: int | None, device: torch.device) -> torch.Tensor:
        """(b, 1, T, T) bool, True = may attend: causal & key is real (& within the window) | the diagonal."""
        T = self.ids.shape[1]
        q = torch.arange(T, device=device)[:, None]
        k = torch.arange(T, device=device)[None, :]
        allowed = k <= q
        if sliding_window:
            allowed = allowed & (q - k < sliding_window)
        m = allowed[None] & self.valid.to(device)[:, None, :]
        m = m | torch.eye(T, dtype=torch.bool, device=device)[None]
        return m[:, None]


def _make_batch(seqs: Sequence[Sample], index: list[int]) -> _Batch:
    T = max(seqs[i].n_tokens for i in index)
    b = len(index)
    ids = torch.zeros(b, T, dtype=torch.long)
    valid = torch.zeros(b, T, dtype=torch.bool)
    resp = torch.zeros(b, T, dtype=torch.bool)
    for j, i in enumerate(index):
        n = seqs[i].n_tokens
        ids[j, :n] = seqs[i].input_ids
        valid[j, :n] = True
        resp[j, :n] = seqs[i].response_mask
    return _Batch(index, ids, valid, resp)


def _plan_batches(lengths: list[int], groups: list[list[int]], micro_batch: int | None, sort: bool) -> list[list[int]]:
    """Micro-batches of whole groups (a sample, or a pair's two sequences). With `micro_batch` None, pack groups
    while (#sequences × longest) stays within DEFAULT_TOKENS_PER_BATCH tokens."""
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    order = list(range(len(groups)))
    if sort:
        order.sort(key=lambda g: max(lengths[i] for i in groups[g]))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_groups = 0
    for g in order:
        cand = cur + groups[g]
        if micro_batch is not None:
            full = cur_groups + 1 > micro_batch
        else:
            full = bool(cur) and len(cand) * max(lengths[i] for i in cand) > DEFAULT_TOKENS_PER_BATCH
        if full:
            batches.append(cur)
            cur, cur_groups, cand = [], 0, list(groups[g])
        cur = cand
        cur_groups += 1
    if cur:
        batches.append(cur)
    return batches


def _wrap(layer: nn.Module, idx: int, factors: Factors, names: list[str], ctx: _Ctx,
          stats: dict[str, ModuleStats] | None) -> dict[str, _LoraLinear]:
    prefix = f"model.layers.{idx}."
    out: dict[str, _LoraLinear] = {}
    for name in names:
        rel = name[len(prefix):]
        parent_name, _, attr = rel.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        lin = getattr(parent, attr, None)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"adapter module {name} is not a linear of {type(layer).__name__} {idx}")
        A, B, scale = factors[name]
        wrapped = _LoraLinear(lin, A, B, scale, name, ctx, None if stats is None else stats[name])
        setattr(parent, attr, wrapped)
        out[name] = wrapped
    return out


def _modules_by_layer(model: _Model, factors: Factors) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {i: [] for i in range(model.n_layers)}
    for name, fac in factors.items():
        m = _LAYER_RE.match(name)
        if not m or int(m.group(1)) >= model.n_layers:
            raise ValueError(f"adapter module {name!r} is not in a decoder layer of the base model "
                             f"({model.n_layers} layers)")
        if f"{name}.weight" not in model.keys:
            raise ValueError(f"adapter module {name!r} has no base weight {name}.weight in the checkpoint")
        if len(fac) != 3:
            raise ValueError(f"factors[{name!r}] must be (A, B, scale)")
        by_layer[int(m.group(1))].append(name)
    return by_layer


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


def _layer_forward(model: _Model, layer: nn.Module, idx: int, batch: _Batch, h: torch.Tensor) -> torch.Tensor:
    dev = model.device
    window = getattr(model.config, "sliding_window", None) if model.is_sliding(idx) else None
    T = h.shape[1]
    pos = torch.arange(T, device=dev)[None]
    return layer(h.to(dev), attention_mask=batch.attn_mask(window, dev), position_ids=pos,
                 position_embeddings=model.rope(T))


def _embed_all(model: _Model, batches: list[_Batch]) -> list[torch.Tensor]:
    w = model.embed()
    hs = [F.embedding(b.ids.to(model.device), w).cpu() for b in batches]
    del w
    return hs


# --------------------------------------------------------------------------------------------------------------------
# statistics


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
) -> dict[str, ModuleStats]:
    """Per-module statistics of the reference adapter over the calibration response tokens, one layer at a time.

    base: a `CheckpointReader` (or a checkpoint folder) of a llama / mistral / qwen2 decoder.
    factors: module name ("model.layers.ℓ.self_attn.q_proj") → (A (r, d_in), B (d_out, r), scale) of the reference.
    calib: samples (or pairs, whose chosen and rejected sequences are both used).
    sequential: after layer ℓ's statistics, `transform(ℓ, stats_of_layer_ℓ)` returns replacement (A, B) for any of
        that layer's modules, and layer ℓ's outputs are recomputed with them before feeding layer ℓ+1 (the released
        schedule for low_rank / wanda at ~2 layer-forwards per sample per layer).
    micro_batch: sequences per micro-batch; default packs up to DEFAULT_TOKENS_PER_BATCH padded tokens.
    dtype: forward dtype, default the base checkpoint's; statistics are float64 regardless.
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
    lengths = [s.n_tokens for s in seqs]
    plan = _plan_batches(lengths, [[i] for i in range(len(seqs))], micro_batch, sort=True)
    batches = [_make_batch(seqs, ix) for ix in plan]
    logger.info("calibration statistics: %d sequences in %d micro-batches, %d layers, dtype %s, sequential=%s",
                len(seqs), len(batches), model.n_layers, model.dtype, sequential)
    hs = _embed_all(model, batches)
    result: dict[str, ModuleStats] = {}
    ctx = _Ctx()
    for idx in range(model.n_layers):
        names = by_layer[idx]
        layer = model.layer(idx)
        stats = _new_stats(factors, names, device)
        mods = _wrap(layer, idx, factors, names, ctx, stats)
        with torch.no_grad():
            ctx.collect = True
            for bi, batch in enumerate(batches):
                ctx.token_mask = batch.response.to(device)
                out = _layer_forward(model, layer, idx, batch, hs[bi])
                if not sequential:
                    hs[bi] = out.cpu()
            ctx.collect, ctx.token_mask = False, None
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
        result.update(_stats_to_cpu(stats))
        del layer, mods
        if progress is not None:
            progress(idx + 1, model.n_layers)
    return {n: result[n] for n in factors}


# --------------------------------------------------------------------------------------------------------------------
# gradient scores


def _response_logprobs(model: _Model, norm: nn.Module, w_head: torch.Tensor, batch: _Batch,
                       h: torch.Tensor) -> torch.Tensor:
    """(b,) Σ over response targets of log p(token_t | tokens_<t), float32 (logits of position t-1 predict t)."""
    dev = model.device
    logits = F.linear(norm(h), w_head).to(torch.float32)  # (b, T, V)
    ids = batch.ids.to(dev)
    tgt = (batch.response & batch.valid).to(dev)[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * tgt).sum(1)


def _n_targets(batch: _Batch) -> torch.Tensor:
    return (batch.response & batch.valid)[:, 1:].sum(1)


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

    loss="nll" (snip): L_n = mean NLL over sample n's response tokens (π = base + reference adapter).
    loss="dpo" (pref_snip, `calib` of pairs): L_n = −log σ(β[(log π(y_c) − log π(y_r)) − (log π_0(y_c) −
        log π_0(y_r))]), π_0 = base without adapter, log-probs summed over response tokens.
    accumulate="per_sample" (preset paper): Σ_n |g_n|. "running" (preset official, grads never zeroed): Σ_n |Σ_{j≤n}
        g_j|, samples taken in calibration order.

    Schedule: a streamed forward keeps every layer's input per micro-batch (on the CPU); a streamed backward then
    loads one layer at a time (ℓ = L−1 … 0), recomputes its forward with autograd from the stored input and
    backpropagates the incoming gradient. Per-sample factor gradients come from the captured inputs x_t, z_t = A·x_t
    and output gradients g_t of each adapted linear: ∂L/∂B = s·Σ_t g_t z_tᵀ, ∂L/∂A = s·Σ_t (Bᵀg_t) x_tᵀ, summed per
    sequence with einsum (sequences never interact and padded positions get zero gradient), so a micro-batch may
    hold many samples; a pair's two sequences always share a micro-batch.

    The stored layer inputs take (L+1) x tokens x hidden elements. When that exceeds `max_activation_bytes`
    (default: a quarter of physical memory), the samples are processed in consecutive chunks that fit, each with its
    own forward and backward stream (the base is read twice per chunk); the sums are exact either way, and the
    running sum of preset official is carried from one chunk to the next.
    """
    if loss not in ("nll", "dpo"):
        raise ValueError(f"loss must be 'nll' or 'dpo', got {loss!r}")
    if accumulate not in ("per_sample", "running"):
        raise ValueError(f"accumulate must be 'per_sample' or 'running', got {accumulate!r}")
    if not calib.samples:
        raise ValueError("calibration set is empty")
    if (loss == "dpo") != calib.is_pairs:
        raise ValueError(f"loss={loss!r} needs a calibration set of {'pairs' if loss == 'dpo' else 'samples'}")
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
    seqs = calib.sequences()
    per_item = 2 if loss == "dpo" else 1
    groups = [list(range(i * per_item, (i + 1) * per_item)) for i in range(len(calib.samples))]
    plan = _plan_batches([s.n_tokens for s in seqs], groups, micro_batch, sort=False)
    batches = [_make_batch(seqs, ix) for ix in plan]
    for b in batches:
        bad = [i for j, i in enumerate(b.index) if int(_n_targets(b)[j]) == 0]
        if bad:
            raise ValueError(f"calibration sequence(s) {bad} have no predictable response token (a response "
                             f"token needs a token before it)")
    L = model.n_layers
    total = 2 * L
    logger.info("gradient scores (%s, %s): %d sequences in %d micro-batches, %d layers, dtype %s",
                loss, accumulate, len(seqs), len(batches), L, model.dtype)

    # forward: store each layer's input per micro-batch; for dpo also run π_0 alongside (not stored).
    ctx = _Ctx()
    acts: list[list[torch.Tensor]] = []
    hs = _embed_all(model, batches)
    hs0 = [h.clone() for h in hs] if loss == "dpo" else None
    with torch.no_grad():
        for idx in range(L):
            layer = model.layer(idx)
            _wrap(layer, idx, factors, by_layer[idx], ctx, None)
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
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step, idx in enumerate(reversed(range(L))):
        names = by_layer[idx]
        layer = model.layer(idx)
        ctx.capture = True
        mods = _wrap(layer, idx, factors, names, ctx, None)
        acc = {n: [torch.zeros(factors[n][0].shape, device=device), torch.zeros(factors[n][1].shape, device=device)]
               for n in names}
        running = {n: carry.setdefault(n, [torch.zeros_like(a[0]), torch.zeros_like(a[1])]) for n, a in acc.items()}
        for bi, batch in enumerate(batches):
            x = acts[idx][bi].to(device).requires_grad_(True)
            with torch.enable_grad():
                out = _layer_forward(model, layer, idx, batch, x)
                (gx,) = torch.autograd.grad(out, x, grads[bi].to(device))
            grads[bi] = gx.cpu()
            for n, mod in mods.items():
                ga, gb = mod.per_sample_grads()  # per sequence
                if per_item == 2:
                    ga = ga[0::2] + ga[1::2]
                    gb = gb[0::2] + gb[1::2]
                if accumulate == "per_sample":
                    acc[n][0] += ga.abs().sum(0)
                    acc[n][1] += gb.abs().sum(0)
                else:
                    for j in range(ga.shape[0]):
                        running[n][0] += ga[j]
                        running[n][1] += gb[j]
                        acc[n][0] += running[n][0].abs()
                        acc[n][1] += running[n][1].abs()
        ctx.capture = False
        acts[idx] = []
        for n in names:
            scores[n] = (acc[n][0].cpu(), acc[n][1].cpu())
        del layer, mods
        if progress is not None:
            progress(L + step + 1, total)
    return {n: scores[n] for n in factors}

