"""Dense space: the executor's view of realignment on full checkpoints (docs/algorithm.md §2-§6, dense mode).

A module is one target linear weight W (d_out, d_in). Each of `aligned` and `finetuned` is a full checkpoint or
a PEFT LoRA adapter on `base`, merged tensor by tensor on the fly (in fp32 with the adapter's scale, rounded once
to the base's dtype, exactly what a merged checkpoint saved in that dtype holds). The reference is
W_e = (1+alpha) W_a - alpha W_0 (fp32), or a ready reference checkpoint. Scores are taken on the delta
W_e - W_0 (or on W_e with score_on="weight"); similarity is cos(M*(W_t - W_0), M*(W_e - W_0)); restoration sets
the masked entries of W_t to W_e. The output is a Hugging Face checkpoint with the fine-tuned model's names and
dtypes, written through planned, size-capped shards.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from nlsr_fast import methods
from nlsr_fast.io import CheckpointReader, LoraAdapter
from nlsr_fast.io.finite import NonFinite
from nlsr_fast.io.stream import new_buffer, read_tensor
from nlsr_fast.io.writer import PlannedShards
from nlsr_fast.ops import PackedMask, extrapolate, masked_delta_cosine, row_topk_mask
from nlsr_fast.pipeline.restore import changed_entries, masked_values, put_masked_values

__all__ = ["DEFAULT_TARGETS", "DenseInput", "DenseSpace", "dense_targets", "copy_model_files"]

log = logging.getLogger(__name__)

#: The seven projections of a Llama-family decoder layer (a regex on module names, i.e. weight keys without
#: ".weight").
DEFAULT_TARGETS = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
# Rows per block when scores are formed (bounds the fp32 transient to 1024 x d_in).
_SCORE_ROWS = 1024
# fp32 entries of a block that stays in the CPU's cache through several element-wise steps (2 MiB).
_CACHE_BLOCK = 2**19
# Files of a model folder copied to the output besides the weights.
_MODEL_FILES = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|vocab\..*|"
                          r"merges\.txt|chat_template\..*|added_tokens\.json)$")


class DenseInput:
    """A model given as a full checkpoint, or as a PEFT LoRA adapter on the base (merged on the fly).

    Args:
        role: "aligned", "finetuned" or "reference", for messages.
        source: the checkpoint reader or the adapter.
        base: the base checkpoint (adapters are merged into it).
        nonfinite: the non-finite policy, applied to every tensor read.
    """

    def __init__(self, role: str, source: CheckpointReader | LoraAdapter, base: CheckpointReader,
                 nonfinite: NonFinite) -> None:
        self.role, self.source, self.base, self.nonfinite = role, source, base, nonfinite
        self.adapter = source if isinstance(source, LoraAdapter) else None
        self.folder: Path = source.folder

    @property
    def files(self) -> list[Path]:
        return list(self.source.files)

    def keys(self) -> list[str]:
        return self.base.keys() if self.adapter is not None else self.source.keys()  # type: ignore[union-attr]

    def __contains__(self, key: str) -> bool:
        return key in self.base if self.adapter is not None else key in self.source  # type: ignore[operator]

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key) if self.adapter is not None else self.source.dtype(key)  # type: ignore[union-attr]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key) if self.adapter is not None else self.source.shape(key)  # type: ignore[union-attr]

    def read(self, key: str, base_value: torch.Tensor | None = None, *, checked: bool = True) -> torch.Tensor:
        """Tensor `key` of this model (merged when an adapter adapts it); `base_value` saves re-reading the base;
        `checked=False` skips the non-finite check (for a second read of what was checked already)."""
        nonfinite = self.nonfinite if checked else None
        if self.adapter is None:
            return read_base(self.source, key, nonfinite)  # type: ignore[arg-type]
        w0 = base_value if base_value is not None else read_base(self.base, key, nonfinite)
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name is None or name not in self.adapter:
            return w0
        a, b, scale = adapter_factors(self.adapter, name, nonfinite)
        delta = (b @ a) * scale
        if self.adapter.fan_in_fan_out:
            delta = delta.t()
        return (w0.float() + delta).to(w0.dtype)


def adapter_factors(adapter: LoraAdapter, name: str,
                    nonfinite: NonFinite | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A (r, d_in), B (d_out, r) in fp32 and the scale of module `name` of an adapter, read and checked."""
    from nlsr_fast.lora import read_raw

    m = adapter.module(name)
    a = read_raw(adapter, m.key_a, nonfinite).float()
    b = read_raw(adapter, m.key_b, nonfinite).float()
    return (a.t(), b.t(), m.scale) if m.transposed else (a, b, m.scale)


def read_base(base: CheckpointReader, key: str, nonfinite: NonFinite | None) -> torch.Tensor:
    """Tensor `key` of a checkpoint, read into private memory and checked by the non-finite policy (if given)."""
    t = read_tensor(base.info(key))
    if nonfinite is not None:
        nonfinite.check(t, file=base.file_of(key), tensor=key)
    return t


def file_position(model: DenseInput, key: str) -> tuple[int, int]:
    """(file index, byte offset) of tensor `key` in `model`'s files (the base's, for an adapter): reading in this
    order reads each file front to back."""
    reader = model.base if model.adapter is not None else model.source
    info = reader.info(key)  # type: ignore[union-attr]
    return [Path(f) for f in reader.files].index(Path(info.file)), info.start  # type: ignore[union-attr]


def dense_targets(model: DenseInput, pattern: str) -> list[str]:
    """Module names (weight keys without ".weight") of the 2-D float weights whose name matches `pattern`."""
    from nlsr_fast.io.adapter import module_order_key

    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"targets {pattern!r} is not a valid regular expression: {exc}") from None
    names = [k[: -len(".weight")] for k in model.keys()
             if k.endswith(".weight") and rx.search(k[: -len(".weight")]) and len(model.shape(k)) == 2
             and model.dtype(k).is_floating_point]
    if not names:
        raise ValueError(f"{model.folder}: no 2-D float weight matches targets {pattern!r}")
    return sorted(names, key=module_order_key)


class DenseModule(NamedTuple):
    w_t: torch.Tensor  # fine-tuned weight, output dtype
    w_e: torch.Tensor  # reference weight, fp32 (safelora with an aligned adapter: W_a, the base's dtype)
    w_0: torch.Tensor  # base weight, stored dtype


class LowRankOutput(NamedTuple):
    """What pass 2 reads for a module safelora projects on an aligned adapter's change (W_0 + left @ Q)."""

    w_t: torch.Tensor  # fine-tuned weight, output dtype (the changed entries are counted against it)
    w_0: torch.Tensor  # base weight, stored dtype
    left: torch.Tensor  # d_out x r, fp32: the aligned change is left @ right


class DenseSpace:
    """Target linears of a fine-tuned model against a reference made from the aligned model (or given).

    Args:
        base, aligned, finetuned: the three models (aligned is None when `reference` is given).
        reference: a ready reference checkpoint, or None to amplify `aligned` with `alpha`.
        targets: module names in model order.
        method: a method of dense mode (nlsr_fast.methods): a draw, a score of the weights (with `col_scale` for a
            statistics method), or masks precomputed by gradient calibration.
        score_on: "delta" (W_e - W_0) or "weight" (W_e).
        sparsity, alpha, seed, backend, device: as in RealignConfig.
        out: the output checkpoint (None for scoring only).
        col_scale: {module: (d_in,) column factor of the score} for a statistics method (wanda: sqrt(mean x^2)).
        unaligned, beta, dare_rate: resta's unaligned model (None: the base), safety-vector weight and DARE rate.
    """

    def __init__(self, base: CheckpointReader, aligned: DenseInput | None, finetuned: DenseInput,
                 reference: DenseInput | None, *, targets: list[str], method: str, score_on: str, sparsity: float,
                 alpha: float, seed: int, backend: str | None, device: torch.device, nonfinite: NonFinite,
                 out: PlannedShards | None = None, col_scale: dict[str, torch.Tensor] | None = None,
                 rest: dict[str, tuple[str, torch.Tensor | None]] | None = None, unaligned: DenseInput | None = None,
                 beta: float | None = None, dare_rate: float | None = None) -> None:
        self.base, self.aligned, self.ft, self.reference = base, aligned, finetuned, reference
        self.modules = targets
        self.method, self.score_on = method, score_on
        self.sparsity, self.alpha, self.seed = sparsity, alpha, seed
        self.backend, self.device, self.nonfinite = backend, device, nonfinite
        self.out = out
        self.col_scale = col_scale or {}
        self.rest = rest or {}
        self._module_set = set(targets)
        self.spec = methods.get(method, "dense")
        self.unaligned, self.beta, self.dare_rate = unaligned, beta, dare_rate
        # safelora with an aligned adapter: a module's Q (pass 1's similarity) until restore_values stashes it
        self._projected: dict[str, torch.Tensor] = {}

    def mask_keys(self, name: str) -> tuple[str]:
        return (name,)

    def reference_weight(self, key: str, w_0: torch.Tensor) -> torch.Tensor:
        """W_e (fp32) of weight `key`."""
        if self.reference is not None:
            return self.reference.read(key, w_0).float()
        assert self.aligned is not None
        w_a = self.aligned.read(key, w_0)
        out = new_buffer(w_a.numel() * 4).view(torch.float32).reshape(w_a.shape)
        return extrapolate(w_a, w_0, self.alpha, out=out, backend=self.backend)

    def load(self, name: str) -> Any:
        """The module's fine-tuned, reference and base weights; for resta only its shape (pass 1 draws the DARE
        mask, pass 2 reads the weights once)."""
        key = f"{name}.weight"
        if self.spec.repair == "add":
            return tuple(self.ft.shape(key))
        w_0 = read_base(self.base, key, self.nonfinite)
        w_t = self.ft.read(key, w_0)
        if self._lowrank(name):  # no fp32 copy: dense_lowrank_projection subtracts a few rows at a time in fp32
            assert self.aligned is not None
            w_e = self.aligned.read(key, w_0)
        else:
            w_e = self.reference_weight(key, w_0)
        return DenseModule(w_t.to(self.device), w_e.to(self.device), w_0.to(self.device))

    def score_tensor(self, loaded: DenseModule, out: torch.Tensor | None = None) -> torch.Tensor:
        """What the scores rank: the reference's delta W_e - W_0 (default, into `out` when given) or W_e itself."""
        if self.score_on != "delta":
            return loaded.w_e
        return torch.sub(loaded.w_e, loaded.w_0) if out is None else torch.sub(loaded.w_e, loaded.w_0, out=out)

    @staticmethod
    def _block(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A rows x cols scratch block from the run's buffer pool (a fresh one each block would be fresh pages)."""
        return new_buffer(rows * cols * dtype.itemsize).view(dtype).reshape(rows, cols)

    def _work_block(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A rows x cols scratch block where the arithmetic runs: the pooled one on the CPU, a fresh one on a device."""
        if self.device.type == "cpu":
            return self._block(rows, cols, dtype)
        return torch.empty((rows, cols), dtype=dtype, device=self.device)

    def masks(self, name: str, loaded: DenseModule) -> dict[str, PackedMask]:
        keep = 1.0 - self.sparsity
        spec = self.spec
        if spec.repair == "project":  # a projected module is replaced whole
            return {name: PackedMask.ones(tuple(loaded.w_t.shape), self.device)}
        if spec.repair == "add":  # the entries of the fine-tuning change kept: DARE's draw, or all of them
            d_out, d_in = self.ft.shape(f"{name}.weight")
            if not self.dare_rate:
                return {name: PackedMask.ones((d_out, d_in), self.device)}
            from nlsr_fast.methods.resta import dare_keep

            kept = dare_keep((d_out, d_in), self.dare_rate, self.seed, name)
            return {name: PackedMask.from_bool(kept).to(self.device)}
        if spec.draw is not None:
            return {name: spec.draw(loaded.w_e, sparsity=self.sparsity, seed=self.seed, key=name, backend=self.backend)}
        if spec.gradients:
            raise AssertionError(f"masks of method {self.method!r} are computed by calibration before pass 1")
        scale = None
        if spec.col_scale is not None:  # a statistics method: |W| x its per-column input scale (runs.DenseRun)
            scale = self.col_scale[name].to(device=self.device, dtype=torch.float32)
        # Rows are masked independently, so the fp32 delta is formed one block of rows at a time: the transient
        # stays at _SCORE_ROWS rows whatever the weight's size.
        mask = PackedMask.empty(tuple(loaded.w_e.shape), self.device)
        d_out, d_in = loaded.w_e.shape
        for r in range(0, d_out, _SCORE_ROWS):
            rows = slice(r, r + _SCORE_ROWS)
            out = self._block(min(_SCORE_ROWS, d_out - r), d_in, torch.float32)
            if spec.calibrate_on == "finetuned":  # antidote scores the fine-tuned weights themselves
                block = out.copy_(loaded.w_t[rows])
            else:
                block = self.score_tensor(DenseModule(loaded.w_t[rows], loaded.w_e[rows], loaded.w_0[rows]), out=out)
            mask.bits[rows] = row_topk_mask(block, keep, col_scale=scale, backend=self.backend).bits
        return {name: mask}

    def similarity(self, name: str, loaded: DenseModule, masks: dict[str, PackedMask]) -> float | None:
        """S_m of the module; None for resta, which repairs every module without ranking them."""
        from nlsr_fast.pipeline.similarity import logged_warnings

        if self.spec.repair == "add":
            return None
        if self.spec.repair == "project":  # safelora: the reference is the aligned model itself
            if not self._lowrank(name):
                return self.projection(name, loaded)[1]
            self._projected[name], cos = self.lowrank_projection(name, loaded)
            return cos

        with logged_warnings():
            return masked_delta_cosine(loaded.w_t, loaded.w_e, masks[name].to(self.device), base=loaded.w_0,
                                       name=name, backend=self.backend)

    def restore_values(self, name: str, loaded: DenseModule, masks: dict[str, PackedMask]) -> dict[str, torch.Tensor]:
        """W_e under the mask, cast to W_t's dtype (what restoration puts there), one block of rows at a time.
        Nothing for prune (zeros). For project, safelora's Q (r x d_in fp32, about 2 r / d_out bytes per entry) when
        the aligned model is an adapter, so pass 2 writes W_0 + left @ Q with one GEMM; nothing with a full aligned
        checkpoint (the few chosen modules are projected again in pass 2: keeping every module's full-rank
        projection would stash the whole model)."""
        if self.spec.repair == "project" and name in self._projected:
            return {name: self._projected.pop(name)}
        if self.spec.repair != "restore":
            return {}
        mask = masks[name].to(self.device)
        blocks = []
        for r in range(0, mask.rows, _SCORE_ROWS):
            n = min(_SCORE_ROWS, mask.rows - r)
            cast = self._block(n, mask.cols, loaded.w_t.dtype).copy_(loaded.w_e[r:r + n])  # rounds as .to() does
            blocks.append(masked_values(cast, PackedMask(mask.bits[r:r + n], (n, mask.cols)), backend=self.backend))
        return {name: torch.cat(blocks) if blocks else loaded.w_t.new_empty(0)}

    def resta_inputs(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_t, W_a and W_u of a module (each read once and checked; the base stands for the unaligned model unless
        one was given)."""
        key = f"{name}.weight"
        w_0 = read_base(self.base, key, self.nonfinite)
        assert self.aligned is not None
        w_u = w_0 if self.unaligned is None else self.unaligned.read(key, w_0)
        return self.ft.read(key, w_0), self.aligned.read(key, w_0), w_u

    def write_resta(self, name: str, loaded: tuple[torch.Tensor, ...], masks: dict[str, PackedMask] | None
                    ) -> dict[str, int]:
        """resta's theta of a module, rounded once into the output's dtype. Computed a few rows at a time in a small
        fp32 block that stays in cache through the element-wise steps (3.5x faster than whole-tensor steps at 70B
        shapes, and no fp32 copy of the weight)."""
        from nlsr_fast.methods.resta import combine

        assert self.out is not None and self.beta is not None and masks is not None
        w_t, w_a, w_u = (t.to(self.device) for t in loaded)
        d_out, d_in = w_t.shape
        keep = masks[name].to(self.device).to_bool() if self.dare_rate else None
        new = self._block(d_out, d_in, w_t.dtype)
        step = max(1, _CACHE_BLOCK // max(1, d_in))
        scratch = torch.empty((step, d_in), dtype=torch.float32, device=self.device)
        changed = 0
        for r in range(0, d_out, step):
            rows = slice(r, r + step)
            theta = combine(w_t[rows], w_a[rows], w_u[rows], beta=self.beta, rate=self.dare_rate or 0.0,
                            keep=None if keep is None else keep[rows], out=scratch[: min(step, d_out - r)])
            new[rows].copy_(theta)
            changed += changed_entries(w_t[rows], new[rows])
        self.out.write(f"{name}.weight", new)
        return {name: changed}

    def _lowrank(self, name: str) -> bool:
        """Whether safelora projects module `name` on an aligned adapter's rank-r change (else full rank)."""
        return (self.spec.repair == "project" and self.aligned is not None and self.aligned.adapter is not None
                and name in self.aligned.adapter)

    def projection(self, name: str, loaded: DenseModule) -> tuple[torch.Tensor, float]:
        """safelora's (W_a + C dW in fp32, cos(C dW, dW)) of a module with a full aligned checkpoint (V full rank)
        from its loaded tensors (the reference is W_a)."""
        from nlsr_fast.methods.safelora import dense_projection

        return dense_projection(name, loaded.w_e, loaded.w_0, loaded.w_t)

    def lowrank_projection(self, name: str, loaded: DenseModule) -> tuple[torch.Tensor, float]:
        """safelora's (Q, cos(C dW, dW)) of a module whose aligned change is an adapter's left @ right (rank r), so
        W_a + C dW = W_0 + left @ Q; dW goes through a pooled fp32 buffer."""
        from nlsr_fast.methods.safelora import dense_lowrank_projection

        assert self.aligned is not None
        factors = aligned_change(self.aligned.adapter, name, self.nonfinite)
        assert factors is not None, f"{name}: not adapted by the aligned adapter"
        left, right = (t.to(self.device) for t in factors)
        d_out, d_in = loaded.w_t.shape
        dw = self._work_block(d_out, d_in, torch.float32)
        return dense_lowrank_projection(name, left, right, loaded.w_e, loaded.w_t, dw=dw)

    # -- file order (pass 1 reads in it) and pass 2: the output checkpoint ---------------------------------------
    def file_order(self, names: list[str]) -> list[str]:
        return sorted(names, key=lambda n: file_position(self.ft, f"{n}.weight"))

    def output_items(self, modules: list[str], rest: bool) -> list[str]:
        """Module names (for their weights) and, with `rest`, the keys of every other tensor, in output order."""
        mine = {f"{n}.weight": n for n in modules}
        targets = {f"{n}.weight" for n in self.modules}
        return [mine.get(k, k) for k in self.ft.keys() if k in mine or (rest and k not in targets)]

    def load_output(self, item: str, restored: bool = False) -> Any:
        if item in self._module_set and self.spec.repair == "add":  # resta reads its three models here, ahead
            return self.resta_inputs(item)
        if item in self._module_set and restored and self._lowrank(item):  # safelora: W_0 + left @ Q in write_output
            assert self.aligned is not None
            key = f"{item}.weight"
            w_0 = read_base(self.base, key, None)  # checked in pass 1, as the weight and the factors
            factors = aligned_change(self.aligned.adapter, item)
            assert factors is not None
            return LowRankOutput(self.ft.read(key, w_0, checked=False), w_0, factors[0])
        if item in self._module_set:  # its weight was checked for non-finite values in pass 1
            return self.ft.read(f"{item}.weight", checked=False)
        replacement = self.rest.get(item, ("copy", None))[1]
        return replacement if replacement is not None else self.ft.read(item)

    def write_output(self, item: str, loaded: Any, masks: dict[str, PackedMask] | None,
                     values: dict[str, torch.Tensor] | None) -> dict[str, int]:
        assert self.out is not None
        key = f"{item}.weight" if item in self._module_set else item
        if self.spec.repair == "add" and item in self._module_set:
            return self.write_resta(item, loaded, masks)
        if isinstance(loaded, LowRankOutput):
            return self.write_lowrank(item, loaded, (values or {}).get(item))
        if masks is None or values is None:
            self.out.write(key, loaded)
            return {}
        out = self._block(loaded.shape[0], loaded.shape[1], loaded.dtype)
        value = values.get(item)
        if value is None and self.spec.repair == "project":  # full rank: projected again
            value = self.projection(item, self.load(item))[0].to(loaded.dtype).reshape(-1)
        elif value is None:  # prune: the masked entries become zero
            value = loaded.new_zeros(masks[item].count())
        new, changed = put_masked_values(loaded, masks[item], value, out=out, backend=self.backend)
        self.out.write(key, new)
        return {item: changed}

    def write_lowrank(self, item: str, loaded: LowRankOutput, q: torch.Tensor | None) -> dict[str, int]:
        """safelora's W_0 + left @ Q of a chosen module (Q stashed by pass 1), rounded once into the output's dtype:
        one rank-r GEMM, a block of rows at a time. A run resumed from a pass 1 that stashed no Q computes it
        again."""
        from nlsr_fast.methods.safelora import dense_lowrank_weight

        assert self.out is not None
        w_t, w_0, left = loaded.w_t, loaded.w_0.to(self.device), loaded.left.to(self.device)
        if q is None:
            q = self.lowrank_projection(item, self.load(item))[0]
        d_out, d_in = w_t.shape
        q = q.to(device=self.device, dtype=torch.float32).reshape(left.shape[1], d_in)
        scratch = self._work_block(min(_SCORE_ROWS, d_out), d_in, torch.float32)
        new = self._block(d_out, d_in, w_t.dtype)  # the output, on the CPU
        dense_lowrank_weight(w_0, left, q, out=new, scratch=scratch)
        changed = changed_entries(w_t, new)
        self.out.write(f"{item}.weight", new)
        return {item: changed}


def aligned_change(adapter: LoraAdapter | None, name: str,
                   nonfinite: NonFinite | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(L, R), fp32, with L @ R the change an adapter makes to weight `name` (as DenseInput.read merges it: s B A,
    transposed for fan_in_fan_out); None when `adapter` is None or does not adapt `name` (then the change is 0)."""
    if adapter is None or name not in adapter:
        return None
    a, b, scale = adapter_factors(adapter, name, nonfinite)
    if adapter.fan_in_fan_out:
        return a.t().contiguous(), (b.t() * scale).contiguous()
    return (b * scale).contiguous(), a.contiguous()


class ReferenceReader:
    """The reference model seen as a checkpoint reader, for the calibration engine: W_e (in the base's dtype) for
    the targets, the base's tensors elsewhere; with `finetuned`, every tensor of the fine-tuned model instead. Only
    the reader protocol the engine uses (config, keys, dtype, get, get_many)."""

    def __init__(self, space: DenseSpace, finetuned: bool = False) -> None:
        self.space, self.base = space, space.base
        self.config = space.base.config
        self._targets = {f"{n}.weight" for n in space.modules}
        self.finetuned = finetuned  # the fine-tuned weights instead (a method that calibrates on that model)

    def keys(self) -> list[str]:
        return self.base.keys()

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        if self.finetuned:  # every tensor of the fine-tuned model (its norms and embeddings too), in the base's dtype
            return self.space.ft.read(key).to(self.base.dtype(key))
        if key not in self._targets:
            return self.base.get(key)
        w_0 = read_base(self.base, key, self.space.nonfinite)
        return self.space.reference_weight(key, w_0).to(w_0.dtype)

    def get_many(self, keys: Any) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in keys}


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files of a model folder; returns the names copied."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.is_symlink() and _MODEL_FILES.match(p.name):
            shutil.copyfile(p, dst / p.name)
            copied.append(p.name)
    return copied
