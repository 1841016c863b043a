"""Benchmark cases: inputs for each op at a shape, a bytes/flops model, and a correctness check against the
reference (a fast wrong answer is not a result).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from nlsr_fast import ops
from nlsr_fast.ops.masked_delta_cosine import cosine_from_sums
from nlsr_fast.ops.masked_values import changed_bits
from nlsr_fast.ops.packed_mask import PackedMask
from nlsr_fast.ops.row_topk_mask import row_scores_reference

__all__ = [
    "MASK_OPS",
    "RANDN_TOPK",
    "STREAMING_OPS",
    "TORCH_DENSE",
    "Case",
    "backends_on",
    "check",
    "lora_cosine_torch_dense",
    "make_case",
]

LOG = logging.getLogger(__name__)

STREAMING_OPS = ("masked_delta_cosine", "masked_restore", "extrapolate")
MASK_OPS = ("row_topk_mask", "matrix_topk_mask")
# The baseline provider of lora_masked_cosine: both dense d_out x d_in products formed with torch.
TORCH_DENSE = "torch dense"
# The baseline provider of random_row_mask: what `--method random` did before it, i.i.d. normal scores drawn with
# torch.randn from one CPU generator, moved to the device and ranked with row_topk_mask.
RANDN_TOPK = "randn+topk"

def backends_on(op: str, device: torch.device) -> list[str]:
    """The registered backends of `op` usable for `device`, reference first; a host op's host backends
    (ops.HOST_OPS: it runs on the host whatever the device and moves its result there)."""
    where = torch.device("cpu") if op in ops.HOST_OPS else device
    return [b.value for b in reversed(ops.available(op, where))]


KEEP = 0.2  # the paper's s = 0.8
MASK_DENSITY = 0.2


@dataclass
class Case:
    """One op at one shape and dtype: `run(backend)` calls the public op, `bytes` is the minimal traffic."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fn: Callable[[str], Any]
    bytes: int
    flops: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self, backend: str) -> Any:
        return self.fn(backend)

    def run_fresh(self, backend: str) -> Any:
        """`run` for verification: a reused output buffer is NaN-poisoned first and the result copied out, so a
        backend that writes nothing cannot pass on the previous backend's result."""
        out = self.extra.get("out")
        if out is not None:
            out.fill_(float("nan"))
        got = self.fn(backend)
        return got.clone() if isinstance(got, torch.Tensor) else got


def _mask_bytes(shape: tuple[int, ...]) -> int:
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    return rows * ((cols + 7) // 8)


def _random_mask(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> PackedMask:
    return PackedMask.from_bool(torch.rand(shape, device=device, generator=gen) < MASK_DENSITY)


def lora_cosine_torch_dense(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: PackedMask,
    mask_b: PackedMask,
) -> float:
    """The baseline: form (M_B*B)(M_A*A) for both adapters with torch (factor dtype), cosine summed in fp32."""
    ma, mb = mask_a.to_bool(), mask_b.to_bool()
    wt = (b_t * mb) @ (a_t * ma)
    we = (b_e * mb) @ (a_e * ma)
    dot = torch.sum(wt * we, dtype=torch.float32)
    nt = torch.sum(wt * wt, dtype=torch.float32)
    ne = torch.sum(we * we, dtype=torch.float32)
    return cosine_from_sums(float(dot), float(nt), float(ne), "torch dense")


def make_case(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
    """Inputs for `op`: shape (d_out, d_in) for every op but lora_masked_cosine, which takes (r, d_out, d_in);
    random_row_mask has no input and ignores `dtype` (its Case says torch.bool)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    es = torch.empty((), dtype=dtype).element_size()

    def randn(*s: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(s, device=device, generator=gen) * scale).to(dtype)

    if op == "lora_masked_cosine":
        if len(shape) != 3:
            raise ValueError(f"lora_masked_cosine takes a shape (r, d_out, d_in), got {shape}")
        r, d_out, d_in = shape
        a_t, b_t = randn(r, d_in, scale=0.01), randn(d_out, r, scale=0.01)
        a_e = (a_t.float() + torch.randn(r, d_in, device=device, generator=gen) * 0.01).to(dtype)
        b_e = (b_t.float() + torch.randn(d_out, r, device=device, generator=gen) * 0.01).to(dtype)
        ma = _random_mask((r, d_in), device, gen)
        mb = _random_mask((d_out, r), device, gen)
        factors = (a_t, b_t, a_e, b_e, ma, mb)

        def lora(backend: str) -> float:
            if backend == TORCH_DENSE:
                return lora_cosine_torch_dense(*factors)
            return ops.lora_masked_cosine(*factors, backend=backend)

        nbytes = 2 * es * r * (d_in + d_out) + _mask_bytes((r, d_in)) + _mask_bytes((d_out, r))
        # Grams: three r x r products over d_in and three over d_out (2 flops per multiply-add).
        flops = 2 * 3 * r * r * (d_in + d_out)
        return Case(op, shape, dtype, lora, nbytes, flops, {"dense_flops": 2 * 2 * d_out * r * d_in})

    if len(shape) not in (1, 2):
        raise ValueError(f"{op} takes a shape (d_out, d_in) or (n,), got {shape}")
    n = 1
    for s in shape:
        n *= s
    if op == "row_topk_mask":
        if len(shape) != 2:
            raise ValueError(f"row_topk_mask takes a shape (d_out, d_in), got {shape}")
        w = randn(*shape)
        col_scale = torch.rand(shape[1], device=device, generator=gen)
        return Case(
            op,
            shape,
            dtype,
            lambda b: ops.row_topk_mask(w, KEEP, col_scale=col_scale, backend=b),
            n * es + 4 * shape[1] + _mask_bytes(shape),
            extra={"inputs": (w, col_scale)},
        )
    if op == "random_row_mask":
        if len(shape) != 2:
            raise ValueError(f"random_row_mask takes a shape (rows, cols), got {shape}")
        rows, cols = shape
        stream = ops.random_stream(seed, "bench")

        def random_mask(backend: str) -> PackedMask:
            if backend == RANDN_TOPK:
                g = torch.Generator("cpu").manual_seed(seed)
                return ops.row_topk_mask(torch.randn((rows, cols), generator=g).to(device), KEEP)
            return ops.random_row_mask((rows, cols), KEEP, stream, device=device, backend=backend)

        # No input: the minimal traffic is the mask written (the baseline also writes and reads 4 bytes per entry).
        return Case(op, shape, torch.bool, random_mask, _mask_bytes(shape))
    if op == "matrix_topk_mask":
        x = randn(*shape)
        return Case(
            op,
            shape,
            dtype,
            lambda b: ops.matrix_topk_mask(x, KEEP, backend=b),
            n * es + _mask_bytes(shape),
            extra={"inputs": (x,)},
        )
    if op == "masked_delta_cosine":
        base = randn(*shape, scale=0.02)
        t = (base.float() + torch.randn(shape, device=device, generator=gen) * 1e-3).to(dtype)
        e = (base.float() + torch.randn(shape, device=device, generator=gen) * 1e-3).to(dtype)
        mask = _random_mask(shape, device, gen)
        return Case(
            op,
            shape,
            dtype,
            lambda b: ops.masked_delta_cosine(t, e, mask, base=base, backend=b),
            3 * n * es + _mask_bytes(shape),
            flops=8 * n,
        )
    if op == "masked_restore":
        target, source = randn(*shape), randn(*shape)
        mask = _random_mask(shape, device, gen)
        # Streaming callers reuse one output buffer (out=), as the copy_ baseline does; a fresh allocation per call
        # would time first-touch page faults instead of the kernel.
        out = torch.empty_like(target)
        return Case(
            op,
            shape,
            dtype,
            lambda b: ops.masked_restore(target, source, mask, out=out, backend=b),
            3 * n * es + _mask_bytes(shape),
            extra={"out": out},
        )
    if op == "extrapolate":
        aligned, base = randn(*shape), randn(*shape)
        out = torch.empty_like(aligned)  # reused, as for masked_restore
        return Case(
            op,
            shape,
            dtype,
            lambda b: ops.extrapolate(aligned, base, 0.9, out=out, backend=b),
            3 * n * es,
            flops=3 * n,
            extra={"out": out},
        )
    if op in ("masked_gather", "masked_scatter"):
        target, source = randn(*shape), randn(*shape)
        mask = _random_mask(shape, device, gen)
        values = ops.masked_gather_reference(source, mask)
        if op == "masked_gather":  # traffic: the source once, the mask, the values written
            return Case(op, shape, dtype, lambda b: ops.masked_gather(source, mask, backend=b),
                        n * es + _mask_bytes(shape) + values.numel() * es)
        # the target read, the copy written, the values read
        return Case(op, shape, dtype, lambda b: ops.masked_scatter(target, mask, values, backend=b),
                    2 * n * es + _mask_bytes(shape) + values.numel() * es)
    raise ValueError(f"unknown op {op!r}; choose from {list(ops.OPS)}")


def _check_topk(case: Case, got: PackedMask, ref: PackedMask) -> str | None:
    """A valid top-k: the reference's count (per row or in all), and no kept score below a dropped one
    (beyond a few fp32 ulps of round-off); any tie-break among equal scores is accepted.
    """
    if not isinstance(got, PackedMask) or tuple(got.shape) != tuple(ref.shape):
        return f"expected a PackedMask of shape {tuple(ref.shape)}, got {got!r}"
    if not torch.equal(got.bits, PackedMask.from_bool(got.to_bool()).bits):
        return "padding bits past the last column are set"
    if case.op == "row_topk_mask":
        w, col_scale = case.extra["inputs"]
        scores = row_scores_reference(w, col_scale, None)
        if not torch.equal(got.row_counts(), ref.row_counts()):
            return "per-row counts differ from the reference"
    else:
        (x,) = case.extra["inputs"]
        scores = x.float().abs().reshape(1, -1)
        if got.count() != ref.count():
            return f"keeps {got.count()} entries, the reference {ref.count()}"
    keep = got.to_bool().reshape(scores.shape)
    inf = torch.tensor(float("inf"), device=scores.device)
    lowest_kept = torch.where(keep, scores, inf).amin(dim=1)
    highest_dropped = torch.where(keep, -inf, scores).amax(dim=1)
    slack = 4 * torch.finfo(torch.float32).eps * highest_dropped.abs()
    bad = (lowest_kept < highest_dropped - slack).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        return (
            f"{bad.numel()} rows keep a score below a dropped one; row {i}: kept {float(lowest_kept[i])!r} "
            f"< dropped {float(highest_dropped[i])!r}"
        )
    return None


def _check_random(got: PackedMask, ref: PackedMask, backend: str) -> str | None:
    """Every backend gives the reference's bits; the randn+topk baseline draws another sample, so only its
    per-row counts can agree."""
    if not isinstance(got, PackedMask) or tuple(got.shape) != tuple(ref.shape):
        return f"expected a PackedMask of shape {tuple(ref.shape)}, got {got!r}"
    if backend == RANDN_TOPK:
        return None if torch.equal(got.row_counts(), ref.row_counts()) else "per-row counts differ from the reference"
    if not got.equal(ref):
        return f"{int((got.to_bool() != ref.to_bool().to(got.device)).sum())} entries differ from the reference"
    return None


def check(case: Case, got: Any, ref: Any, *, backend: str = "") -> str | None:
    """None when `got` (from `backend`) agrees with the reference result `ref`, else what is wrong."""
    if case.op in MASK_OPS:
        return _check_topk(case, got, ref)
    if case.op == "random_row_mask":
        return _check_random(got, ref, backend)
    if case.op in ("masked_delta_cosine", "lora_masked_cosine"):
        tol = 5e-2 if backend == TORCH_DENSE else 1e-4
        if not isinstance(got, float) or not abs(got - ref) <= tol:
            return f"cosine {got!r} vs reference {ref!r} (tolerance {tol})"
        return None
    if case.op == "masked_scatter":
        (got, got_changed), (ref, ref_changed) = got, ref
        if got_changed != ref_changed:
            return f"changed count {got_changed} vs reference {ref_changed}"
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{got.dtype} {tuple(got.shape)} vs reference {ref.dtype} {tuple(ref.shape)}"
    if case.op in ("masked_restore", "masked_gather", "masked_scatter"):
        n_bad = changed_bits(got, ref)
        return f"{n_bad} elements differ bitwise" if n_bad else None
    atol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[got.dtype]
    bad = ~((got.float() - ref.float()).abs() <= atol + atol * ref.float().abs())
    n_bad = int(bad.sum())
    return f"{n_bad} elements outside atol = rtol = {atol}" if n_bad else None
