"""The model runtime of the calibration passes: a Llama-family decoder run one layer at a time (docs/algorithm.md §3
"Streaming calibration").

Only one decoder layer is resident at a time. A pass embeds every calibration sequence once, then for each layer ℓ
materialises transformers' own decoder-layer class (built on the 'meta' device, then given the layer's tensors from
the reader), swaps the linears it needs to observe for `_LoraLinear` (W0·x + scale·B(A·x), no dropout, for the
LoRA passes) or `_DenseTap` (W·x, for the dense passes), pushes every micro-batch through it and keeps the outputs
on the CPU as layer ℓ+1's inputs. Rotary embeddings are computed here with the model's rotary class; the final norm
and lm_head are loaded only when a loss is needed. The statistics pass lives in `calib.statistics`, the gradient
pass in `calib.gradients`.

The reader protocol. Every pass takes a `reader` (or a checkpoint folder, opened as `nlsr_fast.io.CheckpointReader`)
and uses only:

* `reader.config` – the model's `config.json` as a dict (`model_type` one of SUPPORTED_MODEL_TYPES);
* `reader.keys()` – every tensor name ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", ...);
* `reader.dtype(key)` – the stored dtype of a tensor (a torch.dtype or its safetensors name), without reading it;
* `reader.get(key)` – one tensor (CPU);
* `reader.get_many(keys)` – several tensors, {key: tensor}.

Any object with these five members works: the LoRA passes read the base model through it (the reference adapter's
factors are passed separately), and dense mode passes a virtual reader whose `get` returns the reference model's
weights (W_e for the target linears, the base tensors elsewhere).

Memory (statistics): samples × tokens × hidden (the hidden states, in the forward dtype) + one layer's weights +
one micro-batch's activations + the statistics (r² + d_in + r float64 per LoRA module, d_in per dense target). It
does not grow with depth. Memory (gradient scores): the layer-boundary activations of every layer are kept for the
backward sweep, (L+1) × samples × tokens × hidden, plus the same per-layer terms and one layer's scores.

Padding: sequences of a micro-batch are right-padded; the boolean attention mask is causal & key-is-real (plus the
sliding window where the config has one), and each query may always see itself so that padded rows never go NaN.
Padded positions never count: statistics and losses read response positions only.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from nlsr_fast.calib.data import CalibrationSet, Sample

if TYPE_CHECKING:  # the statistics containers the wrappers accumulate into (no import at run time: no cycle)
    from nlsr_fast.calib.statistics import DenseStats, ModuleStats

__all__ = ["SUPPORTED_MODEL_TYPES", "DEFAULT_TOKENS_PER_BATCH", "Factors"]

#: config.json model_type → (transformers' module under transformers.models, the class-name prefix).
_ARCHITECTURES = {
    "llama": ("llama", "Llama"),
    "mistral": ("mistral", "Mistral"),
    "qwen2": ("qwen2", "Qwen2"),
    "gemma3_text": ("gemma3", "Gemma3"),  # Gemma 3's text-only checkpoints (Gemma3ForCausalLM)
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)
DEFAULT_TOKENS_PER_BATCH = 8192
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
#: The linear whose output feeds nothing but the decoder layer's output (through the residual add, and Gemma 3's
#: post-feedforward norm), in every architecture of _ARCHITECTURES: a statistics-only forward may skip it.
OUTPUT_ONLY_LINEAR = "mlp.down_proj"
#: The decoder layer's last block (attribute of the layer), whose output feeds nothing but the layer's output.
OUTPUT_ONLY_BLOCK = "mlp"
_STR_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "F32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "BF16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "F16": torch.float16,
    "float64": torch.float64, "F64": torch.float64,
}

#: module name ("model.layers.ℓ.self_attn.q_proj") → (A (r, d_in), B (d_out, r), scale) of the reference adapter.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


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
        # Sequences of the micro-batch that hold response positions, when `token_mask` is not the micro-batch's own
        # (a `_ResponseRowsMLP` runs on its response rows gathered as one sequence); None: counted from token_mask.
        self.n_sequences: int | None = None
        # Statistics only: the layer's output is thrown away, so a `_LoraLinear` with `output_unused` set (the one
        # whose output feeds nothing but the layer's output) returns zeros instead of computing it.
        self.stats_only = False
        # The input the last `_accumulate` saw (and its version), its response rows and their Σ x²: q, k and v, and
        # gate and up, are called on one input tensor, gathered and squared once. The tensor is held, so the identity
        # test cannot match a new tensor at a recycled address.
        self._shared: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def response_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x[token_mask] (N, d_in), Σ_t x_t² over those rows as float64 (d_in,)), computed once per input tensor."""
        assert self.token_mask is not None
        shared = self._shared
        if shared is not None and shared[0] is x and shared[1] == x._version:
            return shared[2], shared[3]
        xs = x.detach()[self.token_mask]  # (N, d_in)
        x_sq = xs.to(torch.float32).square().sum(0, dtype=torch.float64)
        self._shared = (x, x._version, xs, x_sq)
        return xs, x_sq

    def sequences(self) -> int:
        """Sequences of the current micro-batch with response positions."""
        assert self.token_mask is not None
        return self.n_sequences if self.n_sequences is not None else int(self.token_mask.any(1).sum())

    def end_batch(self) -> None:
        """Forget the shared input (after each micro-batch of a collecting pass)."""
        self._shared = None


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
        self.output_unused = False  # see _Ctx.stats_only
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
        ctx = self.ctx
        if ctx.stats_only and self.output_unused and ctx.adapter_on and not torch.is_grad_enabled():
            z = F.linear(x, self.A)
            if ctx.collect:
                self._accumulate(x, z)
            # A broadcast zero, never materialised: nothing reads this output but the discarded layer output.
            return x.new_zeros(()).expand(*x.shape[:-1], self.base.out_features)
        y = self.base(x)
        if not ctx.adapter_on:
            return y
        z = F.linear(x, self.A)
        if torch.is_grad_enabled():
            out = y + self.scale * F.linear(z, self.B)
        else:  # the same two roundings, in place: no (tokens, d_out) temporaries
            out = y.add_(F.linear(z, self.B).mul_(self.scale))
        if ctx.collect:
            self._accumulate(x, z.detach())
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
        xs, x_sq = self.ctx.response_rows(x)  # (N, d_in), (d_in,)
        if z.dtype in (torch.float32, torch.float64):
            zs = z[mask].to(torch.float64)
        else:  # low-precision forward: statistics from an fp32 product, as docs/algorithm.md §3 asks for fp32 or wider
            zs = (xs.to(torch.float32) @ self.A32.T).to(torch.float64)
        st = self.stats
        st.gram += zs.T @ zs
        st.z_sq += zs.square().sum(0)
        st.x_sq += x_sq
        st.n_tokens += int(xs.shape[0])
        st.n_samples += self.ctx.sequences()

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


class _ResponseRowsMLP(nn.Module):
    """A decoder layer's MLP for a statistics-only forward: the MLP runs on the response rows only, and returns a
    broadcast zero.

    The MLP is the last block of every decoder layer of _ARCHITECTURES; when the layer's output is thrown away
    (`_Ctx.stats_only`), its only use is the statistics of its linears, which read response rows only. The rows are
    gathered in the order `x[token_mask]` gives them, which is the order the full forward's statistics read them in.
    """

    def __init__(self, mlp: nn.Module, ctx: _Ctx) -> None:
        super().__init__()
        self.mlp = mlp
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.ctx.token_mask
        assert mask is not None
        rows = x[mask][None]  # (1, N, hidden)
        ctx = self.ctx
        ctx.n_sequences = int(mask.any(1).sum())
        ctx.token_mask = torch.ones(rows.shape[:2], dtype=torch.bool, device=mask.device)
        try:
            self.mlp(rows)
        finally:
            ctx.token_mask, ctx.n_sequences = mask, None
        return x.new_zeros(()).expand(x.shape)


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
        if getattr(self.config, "attn_logit_softcapping", None) is not None:  # SDPA has no soft-capped attention
            raise ValueError(f"model_type {mt!r} with attn_logit_softcapping is not supported by the calibration "
                             "engine (Gemma 2 style attention); Gemma 3 checkpoints have none")
        self.config._attn_implementation = "sdpa"
        self.model_type = mt
        module, prefix = _ARCHITECTURES[mt]
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        self.layer_cls = getattr(mod, f"{prefix}DecoderLayer")
        self.norm_cls = getattr(mod, f"{prefix}RMSNorm")
        self.rotary = getattr(mod, f"{prefix}RotaryEmbedding")(config=self.config).to(device)
        # Gemma 3: each layer type has its own rotary base (local 10k, global 1M), and the rotary module takes it.
        self._rope_by_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        # Gemma 3 scales its embeddings by sqrt(hidden) (Gemma3TextScaledWordEmbedding) and may soft-cap its logits.
        self._embed_scale = float(self.config.hidden_size) ** 0.5 if module == "gemma3" else None
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)
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
        self._rope_cache: dict[tuple[int, str | None], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- pieces ------------------------------------------------------------------------------------------------------

    def embed(self) -> torch.Tensor:
        return self.reader.get("model.embed_tokens.weight").to(device=self.device, dtype=self.dtype)

    def embed_scale(self) -> torch.Tensor | None:
        """The factor the architecture multiplies embeddings by (None: 1), rounded into the forward dtype as
        transformers rounds it."""
        if self._embed_scale is None:
            return None
        return torch.tensor(self._embed_scale).to(device=self.device, dtype=self.dtype)

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

    def rope(self, T: int, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0..T-1 of decoder layer `idx`."""
        layer_type = self.config.layer_types[idx] if self._rope_by_layer_type else None
        if (T, layer_type) not in self._rope_cache:
            pos = torch.arange(T, device=self.device)[None]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            args = (layer_type,) if self._rope_by_layer_type else ()
            self._rope_cache[T, layer_type] = self.rotary(probe, pos, *args)
        return self._rope_cache[T, layer_type]


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



class _DenseTap(nn.Module):
    """y = W·x (+ bias) of a dense target linear, unchanged; it accumulates `DenseStats` over `ctx.token_mask`
    positions when collecting, and keeps its input and output gradient for per-sample weight gradients when
    capturing."""

    def __init__(self, base: nn.Linear, name: str, ctx: _Ctx, stats: DenseStats | None) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx
        self.stats = stats
        self.captured: list[torch.Tensor] = []
        self._grad_out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.ctx
        if ctx.collect:
            self._accumulate(x)
        if ctx.capture and out.requires_grad:
            self.captured.append(x.detach())
            out.register_hook(self._store_grad)
        return out

    def _store_grad(self, g: torch.Tensor) -> None:
        self._grad_out = g.detach()

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor) -> None:
        assert self.stats is not None and self.ctx.token_mask is not None
        xs, x_sq = self.ctx.response_rows(x)  # (N, d_in), (d_in,)
        st = self.stats
        st.x_sq += x_sq
        st.n_tokens += int(xs.shape[0])
        st.n_samples += self.ctx.sequences()

    def take_captured(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input x (b, T, d_in), output gradient g (b, T, d_out)) of the last captured micro-batch, in the forward
        dtype; ∂L/∂W of sequence j is g[j]ᵀ·x[j] (padded positions have g = 0)."""
        if len(self.captured) != 1 or self._grad_out is None:
            raise RuntimeError(f"{self.name}: expected one captured forward and its gradient, got "
                               f"{len(self.captured)} forwards")
        x, g = self.captured[0], self._grad_out
        self.captured.clear()
        self._grad_out = None
        return x, g


def _find_linear(layer: nn.Module, idx: int, name: str, what: str) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute, the nn.Linear) of module `name` ("model.layers.ℓ.<path>") in decoder layer `idx`."""
    rel = name[len(f"model.layers.{idx}."):]
    parent_name, _, attr = rel.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    lin = getattr(parent, attr, None)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"{what} {name} is not a linear of {type(layer).__name__} {idx}")
    return parent, attr, lin


def _wrap(layer: nn.Module, idx: int, factors: Factors, names: list[str], ctx: _Ctx,
          stats: dict[str, ModuleStats] | None) -> dict[str, _LoraLinear]:
    """Swap the adapted linears `names` of decoder layer `idx` for `_LoraLinear`s with the reference factors."""
    out: dict[str, _LoraLinear] = {}
    for name in names:
        parent, attr, lin = _find_linear(layer, idx, name, "adapter module")
        A, B, scale = factors[name]
        wrapped = _LoraLinear(lin, A, B, scale, name, ctx, None if stats is None else stats[name])
        setattr(parent, attr, wrapped)
        out[name] = wrapped
    return out


def _wrap_dense(layer: nn.Module, idx: int, names: list[str], ctx: _Ctx,
                stats: dict[str, DenseStats] | None) -> dict[str, _DenseTap]:
    """Swap the target linears `names` of decoder layer `idx` for `_DenseTap`s (the layer computes the same)."""
    out: dict[str, _DenseTap] = {}
    for name in names:
        parent, attr, lin = _find_linear(layer, idx, name, "target")
        tap = _DenseTap(lin, name, ctx, None if stats is None else stats[name])
        setattr(parent, attr, tap)
        out[name] = tap
    return out


def _names_by_layer(model: _Model, names: Sequence[str], what: str, weight: str) -> dict[int, list[str]]:
    """{layer: names of that layer, in the given order}; every name must be a linear of a decoder layer with a
    `<name>.weight` tensor in the reader."""
    by_layer: dict[int, list[str]] = {i: [] for i in range(model.n_layers)}
    for name in names:
        m = _LAYER_RE.match(name)
        if not m or int(m.group(1)) >= model.n_layers:
            raise ValueError(f"{what} {name!r} is not in a decoder layer of the base model "
                             f"({model.n_layers} layers)")
        if f"{name}.weight" not in model.keys:
            raise ValueError(f"{what} {name!r} has no {weight} {name}.weight in the checkpoint")
        by_layer[int(m.group(1))].append(name)
    return by_layer


def _modules_by_layer(model: _Model, factors: Factors) -> dict[int, list[str]]:
    by_layer = _names_by_layer(model, list(factors), "adapter module", "base weight")
    for name, fac in factors.items():
        if len(fac) != 3:
            raise ValueError(f"factors[{name!r}] must be (A, B, scale)")
    return by_layer


def _targets_by_layer(model: _Model, targets: Sequence[str]) -> dict[int, list[str]]:
    targets = list(targets)
    if not targets:
        raise ValueError("no target linears given")
    dup = sorted(t for t, c in Counter(targets).items() if c > 1)
    if dup:
        raise ValueError(f"target linears given twice: {dup}")
    bad = [t for t in targets if t.endswith(".weight")]
    if bad:
        raise ValueError(f"targets are module names without '.weight', got {bad[:3]}")
    return _names_by_layer(model, targets, "target", "weight")


def _micro_batches(calib: CalibrationSet, micro_batch: int | None, *, pairs_together: bool,
                   sort: bool) -> list[_Batch]:
    """The micro-batches of every sequence of `calib` (a pair's two sequences together when `pairs_together`)."""
    seqs = calib.sequences()
    per_item = 2 if pairs_together else 1
    groups = [list(range(i * per_item, (i + 1) * per_item)) for i in range(len(seqs) // per_item)]
    plan = _plan_batches([s.n_tokens for s in seqs], groups, micro_batch, sort=sort)
    return [_make_batch(seqs, ix) for ix in plan]


def _layer_forward(model: _Model, layer: nn.Module, idx: int, batch: _Batch, h: torch.Tensor) -> torch.Tensor:
    dev = model.device
    window = getattr(model.config, "sliding_window", None) if model.is_sliding(idx) else None
    T = h.shape[1]
    pos = torch.arange(T, device=dev)[None]
    return layer(h.to(dev), attention_mask=batch.attn_mask(window, dev), position_ids=pos,
                 position_embeddings=model.rope(T, idx))


def _embed_all(model: _Model, batches: list[_Batch]) -> list[torch.Tensor]:
    w, scale = model.embed(), model.embed_scale()
    hs = [F.embedding(b.ids.to(model.device), w) for b in batches]
    hs = [(h if scale is None else h * scale).cpu() for h in hs]
    del w
    return hs

