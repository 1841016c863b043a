"""Shared pieces of the op tests: backends, dtypes with tolerances, awkward shapes, readable ids, and asserts that
say where and how much (CONTRIBUTING.md rules T1-T5).
"""

from __future__ import annotations

import os

import pytest
import torch

from nlsr_fast.ops import available
from nlsr_fast.ops.packed_mask import PackedMask

DEVICE = torch.device("cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The Triton interpreter runs programs one by one in numpy: keep it to small inputs.
INTERP_MAX_NUMEL = 50_000

# (dtype, atol, rtol) for elementwise results (Liger's table).
ELEMENTWISE_TOL = [
    (torch.float32, 1e-6, 1e-6),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]
DTYPES = [d for d, _, _ in ELEMENTWISE_TOL]

# atol floor of the FA rule for reductions (cosines): err(kernel) <= 2 * err(same-dtype torch) + floor.
COSINE_ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# Tiny, a row, a column, primes, non-powers of two, one real d_ff slice (Llama-2-7B / 3-8B MLP width is 11008).
SHAPES_2D = [(1, 1), (1, 17), (5, 1), (3, 7), (37, 301), (64, 4096), (11, 11008)]
SHAPES_1D = [(1,), (13,), (1001,)]

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def backends(op: str) -> list[str]:
    """Backend names usable for `op` on CPU tensors in this process (reference always; cpu and triton when built)."""
    return [b.value for b in available(op, DEVICE)]


def dtype_id(x: object) -> str:
    if isinstance(x, torch.dtype):
        return _DTYPE_NAMES.get(x, str(x).replace("torch.", ""))
    return str(x)


def shape_id(shape: object) -> str:
    if isinstance(shape, tuple):
        return "x".join(str(s) for s in shape)
    return str(shape)


def tol_params(table: list[tuple[torch.dtype, float, float]] = ELEMENTWISE_TOL) -> list[object]:
    """`(dtype, atol, rtol)` rows as pytest params with the dtype's short name as id."""
    return [pytest.param(d, a, r, id=dtype_id(d)) for d, a, r in table]


def shape_params(shapes: list[tuple[int, ...]]) -> list[object]:
    return [pytest.param(s, id=shape_id(s)) for s in shapes]


def skip_if_interpreted_and_large(backend: str, numel: int) -> None:
    """The interpreter is serial numpy: large shapes take minutes there and test nothing new."""
    if backend == "triton" and INTERPRETING and numel > INTERP_MAX_NUMEL:
        pytest.skip(f"{numel} elements is too large for the Triton interpreter (limit {INTERP_MAX_NUMEL})")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_mask(
    shape: tuple[int, ...], density: float = 0.5, *, generator: torch.Generator | None = None
) -> PackedMask:
    """A random PackedMask with the first entry always set (so no masked norm is zero by chance)."""
    m = torch.rand(shape, generator=generator) < density
    m.view(-1)[0] = True
    return PackedMask.from_bool(m)


def _first_indices(bad: torch.Tensor, limit: int = 5) -> list[tuple[int, ...]]:
    idx = bad.nonzero()[:limit]
    return [tuple(int(v) for v in row) for row in idx]


def assert_meta(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Shape, dtype and device agree (CONTRIBUTING.md rule T8)."""
    assert isinstance(out, torch.Tensor), f"{name}: expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    assert out.device == ref.device, f"{name}: device {out.device} != reference {ref.device}"


def assert_close_to_reference(name: str, out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float) -> None:
    """|out - ref| <= atol + rtol * |ref| everywhere (NaN only where the reference has NaN), with a report of the
    mismatch count, the max abs error and the first indices.
    """
    assert_meta(name, out, ref)
    o = out.double()
    r = ref.double()
    both_nan = o.isnan() & r.isnan()
    err = (o - r).abs()
    bad = ~both_nan & ~(err <= atol + rtol * r.abs())  # NaN in out or ref alone counts as a mismatch
    n_bad = int(bad.sum())
    if n_bad:
        first = _first_indices(bad)
        pairs = ", ".join(f"{i}: {o[i].item()!r} vs {r[i].item()!r}" for i in first)
        max_err = float(err[bad & ~err.isnan()].max()) if bool((bad & ~err.isnan()).any()) else float("nan")
        raise AssertionError(
            f"{name}: {n_bad} of {out.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs err {max_err:.3g}; first (index: out vs ref) {pairs}"
        )


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Every element has the same bit pattern (NaN payloads and -0.0 included)."""
    assert_meta(name, out, ref)
    view = _INT_VIEW[out.element_size()]
    o = out.contiguous().view(view)
    r = ref.contiguous().view(view)
    bad = o != r
    n_bad = int(bad.sum())
    if n_bad:
        first = _first_indices(bad)
        width = 2 * out.element_size()
        pairs = ", ".join(
            f"{i}: 0x{int(o[i]) & (2 ** (8 * out.element_size()) - 1):0{width}x} "
            f"vs 0x{int(r[i]) & (2 ** (8 * out.element_size()) - 1):0{width}x}"
            for i in first
        )
        raise AssertionError(f"{name}: {n_bad} of {out.numel()} elements differ bitwise; first (out vs ref) {pairs}")


def assert_mask_well_formed(name: str, mask: PackedMask, shape: tuple[int, ...], device: torch.device) -> None:
    """A PackedMask of `shape` on `device` whose padding bits are 0 (the layout in nlsr_fast/ops/packed_mask.py)."""
    assert isinstance(mask, PackedMask), f"{name}: expected a PackedMask, got {type(mask).__name__}"
    assert tuple(mask.shape) == tuple(shape), f"{name}: mask shape {tuple(mask.shape)} != {tuple(shape)}"
    assert mask.device == device, f"{name}: mask on {mask.device}, expected {device}"
    assert mask.bits.dtype == torch.uint8, f"{name}: bits dtype {mask.bits.dtype}"
    repacked = PackedMask.from_bool(mask.to_bool()).bits
    bad = repacked != mask.bits
    if bool(bad.any()):
        first = _first_indices(bad)
        got = ", ".join(f"{i}: 0x{int(mask.bits[i]):02x} (want 0x{int(repacked[i]):02x})" for i in first)
        raise AssertionError(f"{name}: {int(bad.sum())} bytes have padding bits set past cols={mask.cols}; {got}")


def kth_largest(scores: torch.Tensor, k: int, *, per_row: bool) -> torch.Tensor:
    """The k-th largest score of each row (per_row, shape (rows, 1)) or of the whole tensor (shape ())."""
    s = scores.double()
    if per_row:
        s2 = s.reshape(s.shape[0], -1)
        return torch.topk(s2, k, dim=1).values[:, -1:]
    return torch.topk(s.reshape(-1), k).values[-1]


def tie_atol(kth: torch.Tensor) -> torch.Tensor:
    """Scores within this of the k-th value count as tied: a few fp32 ulps, so only round-off can reorder them."""
    return 4 * torch.finfo(torch.float32).eps * kth.abs() + 1e-30


def assert_masks_match(
    mask: PackedMask,
    ref_mask: PackedMask,
    scores: torch.Tensor,
    k: int,
    per_row: bool,
    *,
    atol: float | torch.Tensor | None = None,
    name: str = "mask",
) -> None:
    """Exact counts (k per row, or k in all), and agreement with the reference mask except at positions whose
    reference score lies within `atol` of the k-th value (any tie-break among equal scores is accepted).
    """
    assert_mask_well_formed(name, mask, tuple(ref_mask.shape), ref_mask.device)
    got = mask.to_bool()
    want = ref_mask.to_bool()
    scores = scores.reshape(got.shape)
    if per_row:
        g2 = got.reshape(got.shape[0] if got.ndim == 2 else 1, -1)
        counts = g2.sum(dim=1)
        wrong = (counts != k).nonzero().flatten()
        if wrong.numel():
            rows = ", ".join(f"row {int(r)}: {int(counts[r])}" for r in wrong[:5])
            raise AssertionError(f"{name}: {wrong.numel()} rows do not keep exactly k={k}; {rows}")
    else:
        total = int(got.sum())
        assert total == k, f"{name}: keeps {total} entries in all, expected exactly k={k} of {got.numel()}"
    if k == 0:
        return
    kth = kth_largest(scores, k, per_row=per_row)
    tol = tie_atol(kth) if atol is None else torch.as_tensor(atol, dtype=torch.float64)
    s = scores.double().reshape(kth.shape[0], -1) if per_row else scores.double().reshape(-1)
    g = got.reshape(s.shape)
    w = want.reshape(s.shape)
    tied = (s - kth).abs() <= tol
    bad = (g != w) & ~tied
    n_bad = int(bad.sum())
    if n_bad:
        first = _first_indices(bad)
        kth_b = kth.expand_as(s) if per_row else kth.expand(s.shape)
        items = ", ".join(
            f"{i}: got {bool(g[i])} want {bool(w[i])} score {s[i].item():.9g} (k-th {kth_b[i].item():.9g})"
            for i in first
        )
        raise AssertionError(
            f"{name}: {n_bad} of {g.numel()} entries differ from the reference away from the threshold; first {items}"
        )


def torch_delta_cosine_same_dtype(
    t: torch.Tensor, e: torch.Tensor, mask: torch.Tensor, base: torch.Tensor | None
) -> float:
    """The plain torch computation in the inputs' dtype (the FA rule's yardstick)."""
    dt = t.dtype
    a = t if base is None else t - base.to(dt)
    b = e.to(dt) if base is None else e.to(dt) - base.to(dt)
    a = a * mask.to(dt)
    b = b * mask.to(dt)
    dot = (a * b).sum()
    na = (a * a).sum()
    nb = (b * b).sum()
    return float(dot / (na.sqrt() * nb.sqrt()))


def torch_lora_cosine_same_dtype(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: torch.Tensor,
    mask_b: torch.Tensor,
) -> float:
    """Dense products (M_B*B)(M_A*A) in the factors' dtype, cosine in that dtype (the FA rule's yardstick)."""
    dt = a_t.dtype
    wt = (b_t * mask_b.to(dt)) @ (a_t * mask_a.to(dt))
    we = (b_e * mask_b.to(dt)) @ (a_e * mask_a.to(dt))
    dot = (wt * we).sum()
    return float(dot / ((wt * wt).sum().sqrt() * (we * we).sum().sqrt()))


def assert_cosine_fa_rule(name: str, value: float, oracle: float, torch_same_dtype: float, *, floor: float) -> None:
    """FA rule: |value - oracle| <= 2 * |torch_same_dtype - oracle| + floor, oracle computed in fp64."""
    assert isinstance(value, float), f"{name}: expected a Python float, got {type(value).__name__}"
    err = abs(value - oracle)
    torch_err = abs(torch_same_dtype - oracle)
    bound = 2 * torch_err + floor
    assert err <= bound, (
        f"{name}: cosine {value!r} vs fp64 oracle {oracle!r}: error {err:.3g} > bound {bound:.3g} "
        f"(2 x same-dtype torch error {torch_err:.3g} + floor {floor:g})"
    )


def delta_cosine_fp64(t: torch.Tensor, e: torch.Tensor, mask: torch.Tensor, base: torch.Tensor | None) -> float:
    """The fp64 oracle for masked_delta_cosine, from the (already rounded) inputs."""
    a = t.double() - (0 if base is None else base.double())
    b = e.double() - (0 if base is None else base.double())
    a = torch.where(mask, a, 0.0)
    b = torch.where(mask, b, 0.0)
    return float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt())


def lora_cosine_fp64(
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
    mask_a: torch.Tensor,
    mask_b: torch.Tensor,
) -> float:
    """The fp64 oracle for lora_masked_cosine, forming the dense products (independent of the Gram identity)."""
    wt = (b_t.double() * mask_b) @ (a_t.double() * mask_a)
    we = (b_e.double() * mask_b) @ (a_e.double() * mask_a)
    return float((wt * we).sum() / ((wt * wt).sum() * (we * we).sum()).sqrt())
